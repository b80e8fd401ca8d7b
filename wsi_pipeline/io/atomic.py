"""Atomic publish: Zarr v3 groups and files are written under a temporary name and renamed when complete.

A store at its final path is always complete: writers build it at `<name>.tmp-<pid>-<host>-<unique>` and rename it
into place, so a killed run leaves only a temporary and two concurrent runs never mix their chunks. The writer's
process id and host are in the name so that clean-up removes only temporaries whose writer is gone: a concurrent
writer's half-written store is never deleted under it. The first complete store wins unless the writer asks to
overwrite.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zarr

TMP_MARK = ".tmp-"
LEGACY_TMP_SUFFIX = ".tmp"  # fixed temporary names of older writers: no writer in the name
# A temporary written on another host cannot be checked for a live writer: it is left alone until untouched this long.
FOREIGN_STALE_S = 24 * 3600
PUBLISH_ATTEMPTS = 20  # concurrent publishers of one path: a swap is retried when another moved the store meanwhile
IN_THE_WAY = (errno.EEXIST, errno.ENOTEMPTY)  # rename onto an existing non-empty folder


def host_tag() -> str:
    """This machine's name as it appears in temporary names (letters, digits, '.', '-'; at most 64 characters)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def temporary_name(final_path: Path) -> Path:
    """A name beside `final_path` unique to this writer (process id, host, random), marked as temporary."""
    return final_path.with_name(f"{final_path.name}{TMP_MARK}{os.getpid()}-{host_tag()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a writer's temporary (ours, or the fixed `<name>.tmp` of older writers)."""
    return TMP_MARK in path.name or path.name.endswith(LEGACY_TMP_SUFFIX)


def temporary_writer(path: Path) -> tuple[int, str | None] | None:
    """(pid, host) of the process writing temporary `path`; host None for names of older versions, which carried
    only the pid (they were written on the host that cleans them up); None when the name says no writer."""
    _, mark, tail = path.name.rpartition(TMP_MARK)
    if not mark:
        return None
    parts = tail.split("-")
    if not parts[0].isdigit():
        return None  # e.g. the `old-<unique>` trash of a swap by an older version
    if len(parts) == 2:
        return int(parts[0]), None
    return (int(parts[0]), "-".join(parts[1:-1])) if len(parts) > 2 else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _untouched_for(path: Path, seconds: float) -> bool:
    """True when nothing in `path` (a file, or a folder and everything below) changed for `seconds`."""
    cutoff = time.time() - seconds
    try:
        if path.lstat().st_mtime > cutoff:
            return False
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    if os.lstat(os.path.join(root, name)).st_mtime > cutoff:
                        return False
    except FileNotFoundError:
        return False  # being renamed or removed by its writer right now
    return True


def writer_gone(path: Path, *, own: bool = False) -> bool:
    """Whether temporary `path` is abandoned: its writer was on this host and is dead, or (another host, or a name
    without a writer) it has not been touched for FOREIGN_STALE_S. With `own`, this process's temporaries and
    the nameless ones count as abandoned too: for a caller whose own write just failed and that holds the lock
    keeping every other writer of the path out."""
    writer = temporary_writer(path)
    if writer is None:
        return own or _untouched_for(path, FOREIGN_STALE_S)
    pid, host = writer
    if host not in (None, host_tag()):
        return _untouched_for(path, FOREIGN_STALE_S)
    if pid == os.getpid():
        return own
    return not pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):  # clean-up is best effort: a read-only folder keeps what it has
            path.unlink(missing_ok=True)


def remove_stale_temporaries(final_path: Path, *, own: bool = False) -> list[Path]:
    """Delete the temporaries of `final_path` whose writer is gone (see `writer_gone`); returns what was deleted."""
    parent = final_path.parent
    if not parent.is_dir():
        return []
    name = glob.escape(final_path.name)
    found = [*parent.glob(f"{name}{TMP_MARK}*"), *parent.glob(f"{name}{LEGACY_TMP_SUFFIX}")]
    gone = [p for p in found if writer_gone(p, own=own)]
    for p in gone:
        _remove(p)
    return gone


def remove_stale_temporaries_in(folder: Path, *, own: bool = False) -> list[Path]:
    """Delete every temporary directly in `folder` whose writer is gone (see `writer_gone`)."""
    if not folder.is_dir():
        return []
    gone = [p for p in folder.iterdir() if is_temporary(p) and writer_gone(p, own=own)]
    for p in gone:
        _remove(p)
    return gone


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


@contextmanager
def atomic_group(final_path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[zarr.Group]:
    """Yield a new Zarr v3 group at a temporary path; on normal exit rename it to `final_path`.

    On an exception the temporary store is removed and nothing at `final_path` is touched.
    With `overwrite=False`, an existing complete store at `final_path` is kept and ours discarded.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final_path)
    try:
        import zarr  # here: the tile job writes its small table without it (io/small_zarr.py)

        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        yield group
        publish(tmp, final_path, overwrite)
    except BaseException:
        settle_zarr_writes()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def settle_zarr_writes(timeout_s: float = 60.0) -> None:
    """Wait for Zarr writes still in flight: when one chunk write fails (a full disk), the others go on running on
    Zarr's I/O loop; removing the store under them would let them recreate its folders (a temporary left behind),
    and their errors would be printed at exit as tracebacks of futures nobody retrieved."""
    import asyncio  # here: asyncio costs ~20 ms to import and only Zarr writers need it

    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or not loop.is_running():
        return

    async def others_done() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    with suppress(Exception):  # best effort: the write has already failed and that error is what the caller sees
        zarr_sync.sync(others_done(), loop=loop, timeout=timeout_s + 5)


def publish(tmp: Path, final_path: Path, overwrite: bool) -> None:
    """Rename a finished temporary store into place (swapping out an old one when `overwrite`).

    Concurrent publishers of one path each end with a complete store in place: a swap that finds the old store
    already moved, or another new one already published, is tried again."""
    for _ in range(PUBLISH_ATTEMPTS):
        try:
            os.rename(tmp, final_path)
            return
        except OSError as err:
            if not final_path.exists():
                if err.errno in IN_THE_WAY:
                    continue  # the store in the way was just moved by another publisher
                raise
        if not overwrite:  # a concurrent writer finished first: its store is complete, keep it
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # The old store moves to a temporary name of ours, so clean-up by others leaves it to us.
        trash = temporary_name(final_path)
        try:
            os.rename(final_path, trash)
        except FileNotFoundError:
            continue  # another publisher moved it first
        try:
            os.rename(tmp, final_path)
        except OSError:
            if not final_path.exists():
                os.rename(trash, final_path)  # ours cannot be published: put the old store back
                raise
            _remove(trash)
            continue  # another publisher's store landed in between: swap it out too
        _remove(trash)
        return
    raise OSError(f"{final_path}: still replaced by other writers after {PUBLISH_ATTEMPTS} attempts to publish")


def row_chunks(n_rows: int, row_bytes: int, target_bytes: int = 1 << 20) -> int:
    """Rows per chunk: about `target_bytes` per chunk (fast row reads, no one-row chunks), at least 1."""
    return max(1, min(max(n_rows, 1), target_bytes // max(row_bytes, 1)))
