"""On-disk stores: Zarr v3 groups written under a temporary name and renamed when complete, plus JSON sidecars.

A store at its final path is always complete: writers build it at `<name>.tmp-<unique>` and rename it into place,
so a killed run leaves only a temporary folder (cleaned up by the next run) and two concurrent runs never mix
their chunks. The first complete store wins; a forced rewrite swaps the old one out.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

TMP_MARK = ".tmp-"


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename over `path` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def jsonable(obj: Any) -> Any:
    """`obj` converted to plain JSON types (for Zarr attributes)."""
    return json.loads(json.dumps(obj, default=_json_default))


def remove_stale_temporaries(final_path: Path) -> None:
    """Delete leftovers of killed writers of `final_path` (their names carry the temporary mark)."""
    parent = final_path.parent
    if not parent.exists():
        return
    for p in parent.glob(f"{final_path.name}{TMP_MARK}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextmanager
def atomic_group(final_path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[zarr.Group]:
    """Yield a new Zarr v3 group at a temporary path; on normal exit rename it to `final_path`.

    On an exception the temporary store is removed and nothing at `final_path` is touched.
    With `overwrite=False`, an existing complete store at `final_path` is kept and ours discarded.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.with_name(f"{final_path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    try:
        yield group
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final_path, overwrite)


def _publish(tmp: Path, final_path: Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, final_path)
        return
    except OSError:
        if not final_path.exists():
            raise
    if not overwrite:  # a concurrent writer finished first: its store is complete, keep it
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = final_path.with_name(f"{final_path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
    os.rename(final_path, trash)
    os.rename(tmp, final_path)
    shutil.rmtree(trash, ignore_errors=True)


def row_chunks(n_rows: int, row_bytes: int, target_bytes: int = 1 << 20) -> int:
    """Rows per chunk: about `target_bytes` per chunk (fast row reads, no one-row chunks), at least 1."""
    return max(1, min(max(n_rows, 1), target_bytes // max(row_bytes, 1)))


@dataclass
class TileTable:
    """The tile grid of one slide as stage 1 wrote it."""

    coords: np.ndarray  # (N, 2) int64, level-0 x, y of each tile's top-left
    tissue_fraction: np.ndarray  # (N,) float32
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def write_tile_table(path: str | os.PathLike[str], coords: np.ndarray, tissue_fraction: np.ndarray,
                     attrs: dict[str, Any]) -> None:
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    fractions = np.asarray(tissue_fraction, dtype=np.float32).reshape(-1)
    if len(coords) != len(fractions):
        raise ValueError("coords and tissue_fraction differ in length")
    with atomic_group(path) as g:
        chunk = row_chunks(len(coords), 16, target_bytes=1 << 22)
        g.create_array("coords", shape=coords.shape, dtype="int64", chunks=(chunk, 2))[...] = coords
        g.create_array("tissue_fraction", shape=fractions.shape, dtype="float32", chunks=(chunk,))[...] = fractions
        g.attrs.update(jsonable({**attrs, "n_tiles": int(len(coords))}))


def read_tile_table(path: str | os.PathLike[str]) -> TileTable:
    g = zarr.open_group(str(path), mode="r")
    return TileTable(coords=np.asarray(g["coords"][...]), tissue_fraction=np.asarray(g["tissue_fraction"][...]),
                     attrs=dict(g.attrs))
