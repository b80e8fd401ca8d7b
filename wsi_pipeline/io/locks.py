"""Exclusive file locks (fcntl.flock) that the kernel drops when the holder dies, even on SIGKILL."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | os.PathLike[str], *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if needed); yields False if `blocking=False` and it is held.

    A killed run never blocks the next: its lock goes with its process."""
    path = Path(path)
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor; an existing lock file in a folder we may not write (a finished cohort on a
    read-only share) is opened read-only: flock needs no write access, so readers still exclude each other."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not path.is_file():
            raise
        return os.open(path, os.O_RDONLY)
