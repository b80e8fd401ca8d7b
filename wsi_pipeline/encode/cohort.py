"""Reading a cohort's features: lazy per-slide bags of one encoder (Zarr arrays, dask arrays, coords, attrs)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import FeatureError
from ..io.zarr_access import read_array, zarr_array
from ..layout import ResultsLayout
from .store import is_complete_store


class FeatureCohort(Mapping[str, zarr.Array]):
    """Lazy per-slide bags of one encoder's features: `bag(id)` (Zarr array), `dask(id)`, `coords(id)`, `attrs`.

    Only complete stores are listed; nothing is read until a bag is indexed."""

    def __init__(self, results: str | os.PathLike[str], encoder: str, slide_ids: list[str] | None = None) -> None:
        self.root = ResultsLayout(results).feature_dir(encoder)
        self.encoder = encoder
        if slide_ids is None:
            found = sorted(self.root.glob("*.zarr")) if self.root.is_dir() else []
            slide_ids = [p.name[: -len(".zarr")] for p in found if is_complete_store(p)]
        else:
            missing = [s for s in slide_ids if not is_complete_store(self.path(s))]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise FeatureError(
                    f"{self.root}: no complete feature store for {len(missing)} slide(s) ({shown}); "
                    "run `wsi-pipeline encode` for them or drop them from the sample sheet"
                )
        self.slide_ids = list(slide_ids)
        self._groups: dict[str, zarr.Group] = {}

    def path(self, slide_id: str) -> Path:
        return self.root / f"{slide_id}.zarr"

    def group(self, slide_id: str) -> zarr.Group:
        if slide_id not in self._groups:
            if slide_id not in self.slide_ids:
                raise KeyError(slide_id)
            self._groups[slide_id] = zarr.open_group(str(self.path(slide_id)), mode="r")
        return self._groups[slide_id]

    def bag(self, slide_id: str) -> zarr.Array:
        return zarr_array(self.group(slide_id), "features")

    def dask(self, slide_id: str) -> Any:
        import dask.array as da

        arr = self.bag(slide_id)
        return da.from_zarr(arr, chunks=(arr.shards or arr.chunks)[0:1] + arr.shape[1:])

    def coords(self, slide_id: str) -> np.ndarray:
        return read_array(self.group(slide_id), "coords")

    @property
    def attrs(self) -> dict[str, dict[str, Any]]:
        return {sid: dict(self.group(sid).attrs) for sid in self.slide_ids}

    @property
    def embed_dim(self) -> int | None:
        return int(self.bag(self.slide_ids[0]).shape[1]) if self.slide_ids else None

    def __getitem__(self, slide_id: str) -> zarr.Array:
        return self.bag(slide_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self.slide_ids)

    def __len__(self) -> int:
        return len(self.slide_ids)


def open_cohort(results: str | os.PathLike[str], encoder: str, slide_ids: list[str] | None = None) -> FeatureCohort:
    """The complete feature stores of `encoder` under `results` (or exactly `slide_ids`, else FeatureError)."""
    return FeatureCohort(results, encoder, slide_ids)
