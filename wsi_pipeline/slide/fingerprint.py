"""Is this the slide that was tiled? A content fingerprint that a restore cannot fake, checked cheaply.

Size and mtime are not enough: `cp -p`, `rsync -a`, `tar x` and backup restores keep the old mtime on a different
file. The fingerprint hashes the size and sampled bytes of the file (its head, where TIFF/DICOM headers and the
first tile offsets live, its tail, and blocks spread over the rest): about 110 KB read, milliseconds on a 3 GB
slide. A DICOM folder hashes every instance's name, size and samples.

Hashing every slide of a 10,000-slide cohort on each DAG build would still cost a read per slide, so the recorded
stamp (size, mtime, ctime, inode) comes first: when all four match, the file was not rewritten (ctime changes on
every write and cannot be set by cp/rsync/tar), and the recorded fingerprint stands without a read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

HEAD_BYTES = 64 << 10
TAIL_BYTES = 16 << 10
BLOCK_BYTES = 4 << 10
BLOCKS = 8
VERSION = 1  # bump when the sampling changes: recorded fingerprints of another version are recomputed


def stat_stamp(path: str | os.PathLike[str]) -> dict[str, int]:
    """What changes whenever a file (or any instance of a DICOM folder) is rewritten or replaced."""
    p = Path(path)
    files = _files(p)
    stats = [f.stat() for f in files] or [p.stat()]  # an empty folder: its own stat (it fails to open anyway)
    return {
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max(s.st_mtime_ns for s in stats),
        "ctime_ns": max(s.st_ctime_ns for s in stats),
        # inode numbers, not device ids: an NFS share has another device id on each node that mounts it
        "inode": int(hashlib.blake2b(repr([s.st_ino for s in stats]).encode(), digest_size=7).hexdigest(), 16),
        "files": len(files),
    }


def content_fingerprint(path: str | os.PathLike[str]) -> str:
    """blake2b of each file's name (DICOM folders), size and sampled bytes; identical files give identical values."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"wsi-fingerprint-v{VERSION}".encode())
    for f in _files(p):
        size = f.stat().st_size
        h.update(f"{f.name if p.is_dir() else ''}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for offset, length in _samples(size):
                fh.seek(offset)
                h.update(fh.read(length))
    return h.hexdigest()


def slide_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The record kept with a tile store: the content fingerprint and the stat stamp it was taken with."""
    return {"fingerprint": content_fingerprint(path), "version": VERSION, **stat_stamp(path)}


def current_fingerprint(path: str | os.PathLike[str], recorded: dict[str, Any] | None) -> str | None:
    """The slide's fingerprint now: the recorded one when its stat stamp still matches (no read), else computed.

    None when the file is missing (its stage-1 failure is recorded elsewhere)."""
    p = Path(path)
    if not p.exists():
        return None
    if recorded and recorded.get("version") == VERSION and recorded.get("fingerprint"):
        stamp = stat_stamp(p)
        if all(recorded.get(k) == v for k, v in stamp.items()):
            return str(recorded["fingerprint"])
    return content_fingerprint(p)


def _files(p: Path) -> list[Path]:
    if p.is_dir():  # a DICOM WSI folder: every instance takes part
        return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return [p]


def _samples(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the head, the tail and BLOCKS blocks spread evenly between them."""
    if size <= HEAD_BYTES + TAIL_BYTES + BLOCKS * BLOCK_BYTES:
        return [(0, size)]
    out = [(0, HEAD_BYTES)]
    span = size - HEAD_BYTES - TAIL_BYTES - BLOCK_BYTES
    out += [(HEAD_BYTES + span * (i + 1) // (BLOCKS + 1), BLOCK_BYTES) for i in range(BLOCKS)]
    out.append((size - TAIL_BYTES, TAIL_BYTES))
    return out


def check_same_slide(path: str | os.PathLike[str], recorded: dict[str, Any] | None) -> None:
    """Raise a one-line `SlideError` when the file at `path` is not the one whose fingerprint was `recorded`
    (stores tiled by versions without a fingerprint are not checked)."""
    from ..errors import SlideError

    if not recorded or recorded.get("version") != VERSION:
        return
    now = current_fingerprint(path, recorded)
    if now is not None and now != recorded.get("fingerprint"):
        raise SlideError(
            f"{path}: not the slide that was tiled (its content fingerprint changed: the file was replaced, e.g. "
            "restored or copied over with its old date); rerun `wsi-pipeline tile` for this slide"
        )
