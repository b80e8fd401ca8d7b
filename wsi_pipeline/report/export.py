"""Export to the HDF5 layouts of CLAM and TRIDENT, for users of those tools: tile coords (`export-h5`), and the
checked read of a feature store (complete, coords equal to the tile table, finite) that every feature export uses
(`feature_formats.py` writes the CLAM, TRIDENT and STAMP feature layouts)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from .. import __version__
from ..encode.store import is_complete_store
from ..errors import FeatureError
from ..io.atomic import temporary_name
from ..io.zarr_access import attrs_dict, read_array
from ..tiling.table import TileTable, read_tile_table


def coords_attrs(table: TileTable) -> dict[str, object]:
    """Attributes CLAM (`patch_level`, `patch_size`, ...) and TRIDENT (`patch_size_level0`, ...) read from `coords`."""
    a = table.attrs
    level0_mag = 10.0 / float(a["slide_mpp"])  # 0.25 µm/px is 40x by the usual convention
    # CLAM's level_dim / downsampled_level_dim: the size of patch_level (tile stores written before
    # read_level_dimensions was recorded: estimated from level 0 and the downsample)
    level_dims = a.get("read_level_dimensions") or [
        round(int(v) / float(a["level_downsample"])) for v in a["slide_dimensions"]
    ]
    return {
        "patch_size": int(a["read_size"]),  # CLAM: size at patch_level
        "patch_level": int(a["read_level"]),
        "downsample": np.array([a["level_downsample"], a["level_downsample"]], dtype=np.float64),
        "level_dim": np.asarray(level_dims, dtype=np.int64),
        "downsampled_level_dim": np.asarray(level_dims, dtype=np.int64),
        "name": str(a["slide_id"]),
        "patch_size_level0": int(round(float(a["tile_size_level0"]))),  # TRIDENT
        "level0_magnification": level0_mag,
        "target_magnification": 10.0 / float(a["target_mpp"]),
        "overlap": float(a.get("overlap", 0.0)),
        "target_mpp": float(a["target_mpp"]),
        "tile_px": int(a["tile_px"]),
    }


def export_h5(
    tile_store: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    features: np.ndarray | None = None,
    extra_attrs: Mapping[str, object] | None = None,
) -> Path:
    """Write `coords` (and `features` when given) with CLAM/TRIDENT attributes to `out_path` (HDF5)."""
    table = read_tile_table(tile_store)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if features is not None and len(features) != len(table):
        raise ValueError(f"{out_path}: {len(features)} feature rows for {len(table)} tiles")
    tmp = temporary_name(out_path)
    try:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=table.coords.astype(np.int64))
            for k, v in coords_attrs(table).items():
                ds.attrs[k] = v
            if features is not None:
                fd = f.create_dataset("features", data=np.asarray(features))
                for k, v in (extra_attrs or {}).items():
                    fd.attrs[k] = v
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


@dataclass
class FeatureStoreData:
    """One complete feature store checked against its tile table: what every export writes from."""

    store: Path
    tile_store: Path
    table: TileTable  # coords equal to the store's, attrs say how the tiles were made
    attrs: dict[str, Any]  # the feature store's attributes

    @property
    def slide_id(self) -> str:
        """The store's name in the results layout (`features/{encoder}/{slide_id}.zarr`)."""
        return self.store.name.removesuffix(".zarr")

    @property
    def n_tiles(self) -> int:
        return len(self.table)

    def features(self) -> np.ndarray:
        """All feature rows (the store's dtype); a row never written (NaN fill) is refused, never exported."""
        feats = read_array(zarr.open_group(str(self.store), mode="r"), "features")
        bad = int((~np.isfinite(feats).all(axis=1)).sum()) if feats.size else 0
        if bad:
            raise FeatureError(
                f"{self.store}: {bad} feature rows are not finite (a shard file missing?); re-encode the slide"
            )
        return feats


def check_feature_store(feature_store: str | os.PathLike[str]) -> FeatureStoreData:
    """A complete feature store whose coords equal its tile table's, else FeatureError (one line, with the fix)."""
    store = Path(feature_store)
    if not is_complete_store(store):
        raise FeatureError(f"{store}: not a complete feature store; run `wsi-pipeline encode` first")
    g = zarr.open_group(str(store), mode="r")
    attrs = attrs_dict(g)
    tile_store = (store.parent / attrs["tile_store_rel"]).resolve()
    if not (tile_store / "zarr.json").is_file():
        tile_store = Path(attrs["tile_store"])
    if not (tile_store / "zarr.json").is_file():
        raise FeatureError(f"{store}: its tile table {tile_store} is missing; keep tiles/ beside features/")
    coords = read_array(g, "coords")
    table = read_tile_table(tile_store)
    if not np.array_equal(table.coords, coords):
        raise FeatureError(f"{store}: coords differ from the tile table {tile_store}; re-encode the slide")
    return FeatureStoreData(store=store, tile_store=tile_store, table=table, attrs=attrs)


def provenance_attrs(data: FeatureStoreData) -> dict[str, object]:
    """Where the features came from, as HDF5-storable scalars (None becomes ""): encoder, weights, tile geometry."""
    a, t = data.attrs, data.table.attrs
    prov = a.get("provenance") or {}
    cfg = a.get("encoder_config") or {}
    values: dict[str, object] = {
        "encoder": a.get("encoder"),
        "model_id": prov.get("model_id") or cfg.get("model_id"),
        "revision": a.get("revision"),
        "weights_sha256": a.get("weights_sha256"),
        "embed_dim": a.get("embed_dim"),
        "source_dtype": a.get("dtype"),
        "package_version": a.get("package_version"),  # wsi_pipeline version that encoded the slide
        "exported_by": f"wsi_pipeline {__version__}",
        "slide_id": data.slide_id,
        "slide_mpp": t.get("slide_mpp"),
        "target_mpp": t.get("target_mpp"),
        "tile_px": t.get("tile_px"),
        "tile_size_level0": t.get("tile_size_level0"),
        "stride_level0": t.get("stride_level0"),
        "overlap_fraction": t.get("overlap", 0.0),
        "read_level": t.get("read_level"),
        "coords_level": 0,
    }
    return {k: "" if v is None else v for k, v in values.items()}


def export_features_h5(feature_store: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """CLAM/TRIDENT-style HDF5 (`features` + `coords` with their attributes) from a feature store."""
    data = check_feature_store(feature_store)
    extra = provenance_attrs(data) | {"dtype": data.attrs.get("dtype", "")}
    return export_h5(data.tile_store, out_path, features=data.features(), extra_attrs=extra)
