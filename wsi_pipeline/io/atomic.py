"""Atomic publish: Zarr v3 groups and files are written under a temporary name and renamed when complete.

A store at its final path is always complete: writers build it at `<name>.tmp-<pid>-<unique>` and rename it into
place, so a killed run leaves only a temporary (cleaned up by the next run) and two concurrent runs never mix
their chunks. The first complete store wins unless the writer asks to overwrite.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zarr

TMP_MARK = ".tmp-"


def temporary_name(final_path: Path) -> Path:
    """A name beside `final_path` unique to this writer (process id + random), marked as temporary."""
    return final_path.with_name(f"{final_path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a unique temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    tmp = temporary_name(final_path)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    try:
        yield group
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final_path, overwrite)


def publish(tmp: Path, final_path: Path, overwrite: bool) -> None:
    """Rename a finished temporary store into place (swapping out an old one when `overwrite`)."""
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
