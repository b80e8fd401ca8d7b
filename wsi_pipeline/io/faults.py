"""Faults of the disk, not of the slide: a full disk, a read-only or forbidden folder, a file where a folder belongs.

`describe_os_error` turns such an `OSError` into the one line a user sees: the folder, what is wrong, how much
space is free (and needed, when known) and the fix. Stages record the line in a slide's sidecar like any other
failure; when even the sidecar cannot be written, `StorageError` carries the line to the command line.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import PipelineError
from .atomic import LEGACY_TMP_SUFFIX, TMP_MARK

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
FILE_IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR)

# What tiling one slide writes, at most about, for the message of a full disk: mostly the two QC thumbnails (PNG,
# at most 2048 px on the long side: 2-6 MB each for real tissue), then the mask, polygons, tile store and sidecar.
TILE_OUTPUT_BYTES = 12 * 1024**2
TILE_NEED = "tiling one slide needs up to about"
# A feature store: per tile, the embedding and its level-0 coordinates (2 x int64); per store, its metadata files
# and shard indexes, and the sidecar (a few files of a 4 KB block or more each).
FEATURE_ROW_OVERHEAD_BYTES = 16
FEATURE_STORE_OVERHEAD_BYTES = 64 * 1024
# The fix a message suggests when the folder cannot take the write: the command's option, or the workflow's key.
ELSEWHERE = "point --out (results: in a workflow config) at another folder"


class StorageError(PipelineError):
    """A write the user must make possible (free space, write access, move a file away); the message says which."""


def human_bytes(n: float) -> str:
    """`n` bytes as a short size: 980 B, 12 KB, 3.4 MB, 120 GB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" and n < 10 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TB"


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (where the free space of a not-yet-made folder is measured)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def file_in_the_way(path: Path) -> Path | None:
    """The first of `path` and its ancestors that is a file (or other non-folder) where a folder is needed."""
    for p in reversed((path, *path.parents)):
        if p.exists() and not p.is_dir():
            return p
    return None


def final_name(path: Path) -> str:
    """The name a temporary will have when published (`thumbnail.png.tmp-12-host-ab12` -> `thumbnail.png`)."""
    name = path.name.split(TMP_MARK)[0]
    return name.removesuffix(LEGACY_TMP_SUFFIX) or path.name


def describe_os_error(
    err: OSError,
    where: str | os.PathLike[str] | None = None,
    *,
    need_bytes: int | None = None,
    need_what: str = "this slide's outputs need about",
    elsewhere: str = ELSEWHERE,
) -> str:
    """One line for a failed write: the folder, the fault, free (and needed) space, and the fix.

    `where` is the folder being written when the error names no file (a failed write() on an open file names
    none); `need_bytes` what the slide's outputs need (omitted when unknown), said as `need_what`; `elsewhere`
    the way to write to another folder (`--out` on the command line, `results:` in a workflow config)."""
    named = Path(os.fsdecode(err.filename)) if err.filename is not None else None
    target = named or (Path(where) if where is not None else Path("."))
    folder = named.parent if named is not None else target
    what = f" (cannot write {final_name(named)})" if named is not None else ""
    blocker = file_in_the_way(target) if err.errno in FILE_IN_THE_WAY else None
    if blocker is not None:
        return f"{blocker}: is a file where a folder is needed: move the file away or {elsewhere}"
    if err.errno in NO_SPACE:
        place = existing_ancestor(folder)
        try:
            free = f"{human_bytes(shutil.disk_usage(place).free)} free"
        except OSError:
            free = "free space unknown"
        need = f"; {need_what} {human_bytes(need_bytes)}" if need_bytes else ""
        fault = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{folder}: {fault} ({free}{need}): free space there or {elsewhere}"
    if err.errno == errno.EROFS:
        return f"{folder}: read-only file system{what}: {elsewhere}"
    if err.errno in NOT_WRITABLE:
        return f"{folder}: permission denied{what}: get write access to it or {elsewhere}"
    reason = " ".join((err.strerror or str(err) or type(err).__name__).split())
    return f"{target}: {reason}: check that the folder is usable or {elsewhere}"


def storage_error(
    err: OSError,
    where: str | os.PathLike[str] | None = None,
    *,
    need_bytes: int | None = None,
    need_what: str = "this slide's outputs need about",
    elsewhere: str = ELSEWHERE,
) -> StorageError:
    """`describe_os_error` as an exception to raise (`raise storage_error(err, folder) from None`)."""
    return StorageError(describe_os_error(err, where, need_bytes=need_bytes, need_what=need_what, elsewhere=elsewhere))
