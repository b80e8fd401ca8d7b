"""The tile table of one slide (`tiles/{slide_id}.zarr`): level-0 coordinates, tissue fractions, and the attributes
that say how they were made. Written once, atomically; every later stage reads it through here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.atomic import row_chunks
from ..io.jsonio import to_jsonable
from ..io.small_zarr import write_small_group


@dataclass
class TileTable:
    """The tile grid of one slide as stage 1 wrote it."""

    coords: np.ndarray  # (N, 2) int64, level-0 x, y of each tile's top-left
    tissue_fraction: np.ndarray  # (N,) float32
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def write_tile_table(
    path: str | os.PathLike[str], coords: np.ndarray, tissue_fraction: np.ndarray, attrs: dict[str, Any]
) -> None:
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    fractions = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
    if len(coords) != len(fractions):
        raise ValueError("coords and tissue_fraction differ in length")
    chunk = row_chunks(len(coords), 16, target_bytes=1 << 22)
    # Written without zarr (io/small_zarr.py): importing it would cost every tile job ~0.2 s; readers use zarr.
    write_small_group(
        path,
        {"coords": coords, "tissue_fraction": fractions},
        {"coords": chunk, "tissue_fraction": chunk},
        to_jsonable({**attrs, "n_tiles": int(len(coords))}),
    )


def read_tile_table(path: str | os.PathLike[str]) -> TileTable:
    import zarr

    from ..io.zarr_access import read_array

    g = zarr.open_group(str(path), mode="r")
    return TileTable(
        coords=read_array(g, "coords"), tissue_fraction=read_array(g, "tissue_fraction"), attrs=dict(g.attrs)
    )


def read_tile_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attributes of a tile store, or None when there is no store at `path`."""
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        return None
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs)


def tiles_signature(tile_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a tile table: a feature store made from another one is stale."""
    return {
        k: tile_attrs.get(k)
        for k in (
            "created",
            "store_id",
            "n_tiles",
            "slide_path",
            "tile_px",
            "target_mpp",
            "read_level",
            "read_size",
            "tile_size_level0",
        )
    }
