"""Export to the HDF5 layouts of CLAM and TRIDENT, for users of those tools."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import zarr

from ..encode.store import is_complete_store
from ..errors import FeatureError
from ..io.atomic import temporary_name
from ..io.zarr_access import attrs_dict, read_array
from ..tiling.table import TileTable, read_tile_table


def coords_attrs(table: TileTable) -> dict[str, object]:
    """Attributes CLAM (`patch_level`, `patch_size`, ...) and TRIDENT (`patch_size_level0`, ...) read from `coords`."""
    a = table.attrs
    level0_mag = 10.0 / float(a["slide_mpp"])  # 0.25 µm/px is 40x by the usual convention
    return {
        "patch_size": int(a["read_size"]),  # CLAM: size at patch_level
        "patch_level": int(a["read_level"]),
        "downsample": np.array([a["level_downsample"], a["level_downsample"]], dtype=np.float64),
        "level_dim": np.asarray(a["slide_dimensions"], dtype=np.int64),
        "downsampled_level_dim": np.asarray(a["slide_dimensions"], dtype=np.int64),
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
    tmp = temporary_name(out_path)
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=table.coords.astype(np.int64))
        for k, v in coords_attrs(table).items():
            ds.attrs[k] = v
        if features is not None:
            if len(features) != len(table):
                raise ValueError(f"{out_path}: {len(features)} feature rows for {len(table)} tiles")
            fd = f.create_dataset("features", data=np.asarray(features))
            for k, v in (extra_attrs or {}).items():
                fd.attrs[k] = v
    os.replace(tmp, out_path)
    return out_path


def export_features_h5(feature_store: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """CLAM/TRIDENT-style HDF5 (`features` + `coords` with their attributes) from a feature store."""
    store = Path(feature_store)
    if not is_complete_store(store):
        raise FeatureError(f"{store}: not a complete feature store; run `wsi-pipeline encode` first")
    g = zarr.open_group(str(store), mode="r")
    attrs = attrs_dict(g)
    tile_store = (store.parent / attrs["tile_store_rel"]).resolve()
    if not (tile_store / "zarr.json").is_file():
        tile_store = Path(attrs["tile_store"])
    coords = read_array(g, "coords")
    if not np.array_equal(read_tile_table(tile_store).coords, coords):
        raise FeatureError(f"{store}: coords differ from the tile table {tile_store}; re-encode the slide")
    extra = {
        "encoder": attrs.get("encoder", ""),
        "dtype": attrs.get("dtype", ""),
        "weights_sha256": attrs.get("weights_sha256") or "",
        "revision": attrs.get("revision") or "",
        "package_version": attrs.get("package_version", ""),
    }
    return export_h5(tile_store, out_path, features=read_array(g, "features"), extra_attrs=extra)
