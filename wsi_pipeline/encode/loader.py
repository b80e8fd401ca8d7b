"""Tiles of one slide as uint8 batches (a torch Dataset over the tile table, its DataLoader) and the loop that
feeds them through an encoder into a feature writer.

Each item is a whole batch of rows, read in one worker (one `read_tile` per tile: one read at the planned level,
one resize). Every worker opens its own slide handle lazily, inside the worker, because OpenSlide/TiffSlide
handles are not safe to share across processes. Batches stay uint8 (4x less to copy than float32) and are pinned
only when CUDA is in use; the encoder normalises on the device. A read failure is returned as a message, not
raised, so the main process can report the slide's one-line `SlideError` instead of a worker traceback.

The loop copies each batch to the device with `non_blocking=True` (from pinned memory: truly asynchronous), halves
the batch on CUDA out-of-memory, and brings embeddings back through pinned memory one batch late, so the GPU works
while the host checks and writes the previous batch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..encoders import TileEncoder, check_finite
from ..errors import FeatureError, PipelineError, SlideError
from ..progress import Progress
from ..slide.fingerprint import check_same_slide
from ..slide.reader import Slide, open_slide
from ..tiling.geometry import TileGeometry, read_tile
from .store import ShardWriter

log = logging.getLogger(__name__)
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class SlideSource:
    """How to reopen the slide a tile table was made from (path, backend, MPP override)."""

    path: str
    backend: str = "auto"
    mpp: float | None = None
    expected_size: int | None = None
    fingerprint: dict[str, Any] | None = None  # recorded at tiling (slide.fingerprint)

    @classmethod
    def from_tile_attrs(cls, attrs: dict[str, Any]) -> SlideSource:
        mpp = float(attrs["slide_mpp"]) if attrs.get("mpp_source") == "override" else None
        size = attrs.get("slide_file_size")
        return cls(
            str(attrs["slide_path"]),
            str(attrs.get("backend", "auto")),
            mpp,
            int(size) if size is not None else None,
            attrs.get("slide_fingerprint"),
        )

    def check_unchanged(self) -> None:
        """Fail early when the slide file was replaced since tiling: its coordinates would be meaningless."""
        p = Path(self.path)
        if not p.exists():
            raise SlideError(
                f"{p}: slide file not found (it was tiled from here); restore it or rerun "
                "`wsi-pipeline tile` with its new path"
            )
        if self.expected_size is not None and p.is_file() and p.stat().st_size != self.expected_size:
            raise SlideError(
                f"{p}: file size changed since tiling ({self.expected_size} -> {p.stat().st_size} "
                "bytes); rerun `wsi-pipeline tile` for this slide"
            )
        check_same_slide(p, self.fingerprint)  # same size, other content: a restore or `cp -p` over it

    def open(self) -> Slide:
        return open_slide(self.path, backend=self.backend, mpp=self.mpp)  # type: ignore[arg-type]


class TileBatchDataset(Dataset):
    """Item i = rows [start + i*B, start + (i+1)*B) of the tile table as (tiles uint8 (b, px, px, 3), row, error)."""

    def __init__(
        self,
        source: SlideSource,
        geometry: TileGeometry,
        coords: np.ndarray,
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.source = source
        self.geometry = geometry
        self.coords = np.asarray(coords, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.start = int(start)
        self.stop = int(len(self.coords) if stop is None else stop)
        self._slide: Slide | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return math.ceil(max(self.stop - self.start, 0) / self.batch_size)

    def slide(self) -> Slide:
        # Opened on first use in whichever process reads: each DataLoader worker gets its own handle.
        if self._slide is None or self._pid != os.getpid():
            self._slide = self.source.open()
            self._pid = os.getpid()
        return self._slide

    def rows(self, index: int) -> tuple[int, int]:
        lo = self.start + index * self.batch_size
        return lo, min(lo + self.batch_size, self.stop)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        lo, hi = self.rows(index)
        px = self.geometry.tile_px
        out = np.empty((hi - lo, px, px, 3), dtype=np.uint8)
        try:
            slide = self.slide()
            for k, xy in enumerate(self.coords[lo:hi]):
                out[k] = read_tile(slide, (int(xy[0]), int(xy[1])), self.geometry)
        except PipelineError as err:  # one line naming the file; raised by the consumer
            return torch.empty(0, px, px, 3, dtype=torch.uint8), lo, str(err)
        return torch.from_numpy(out), lo, ""

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, None  # handles never travel to workers
        return state


def _worker_init(_: int) -> None:
    # One torch thread per worker: parallelism comes from the workers. (cv2.setNumThreads must not be called
    # here: after a fork it tears down the parent's OpenCV thread pool and deadlocks on its condition variable.)
    torch.set_num_threads(1)


def make_loader(
    dataset: TileBatchDataset, *, num_workers: int = 0, device: torch.device | str = "cpu", prefetch_factor: int = 2
) -> DataLoader:
    """A DataLoader of whole batches: bounded prefetch (num_workers x prefetch_factor), pinned only for CUDA."""
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, worker_init_fn=_worker_init, persistent_workers=False)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin, **kwargs)


@dataclass
class _Batching:
    size: int


def _encode_backoff(enc: TileEncoder, tiles: torch.Tensor, state: _Batching) -> torch.Tensor:
    """Encode in sub-batches of `state.size`, halving it on CUDA out-of-memory (kept for the rest of the run)."""
    outs, i = [], 0
    while i < len(tiles):
        try:
            outs.append(enc.encode_uint8(tiles[i : i + state.size]))
            i += state.size
        except _OOM as err:
            if state.size == 1:
                raise FeatureError(
                    f"encoder {enc.name!r} runs out of device memory with one tile per batch; "
                    "use a smaller encoder.image_size or a larger GPU"
                ) from err
            state.size //= 2
            log.warning("CUDA out of memory: batch size halved to %d", state.size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return torch.cat(outs) if len(outs) != 1 else outs[0]


def _to_host(emb: torch.Tensor) -> tuple[torch.Tensor, Any]:
    if emb.device.type != "cuda":
        return emb, None
    # Async copy into pinned memory; waited on one batch later, so the GPU runs while the host writes.
    host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
    host.copy_(emb, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return host, ev


def _consume(pending: tuple[torch.Tensor, Any, int], writer: ShardWriter, dtype: str, context: str) -> None:
    host, ev, row = pending
    if ev is not None:
        ev.synchronize()
    where = f"{context}, tiles {row}-{row + len(host) - 1}"
    check_finite(host, where)
    with np.errstate(over="ignore"):  # overflow is detected just below, with a useful message
        arr = host.numpy().astype(dtype)
    if not np.isfinite(arr).all():
        raise FeatureError(
            f"{where}: embeddings overflow {dtype} (|x| > {np.finfo(dtype).max:g}); "
            "store float32 (encode.dtype: float32)"
        )
    writer.append(arr)


def encode_rows(
    enc: TileEncoder,
    dataset: TileBatchDataset,
    writer: ShardWriter,
    *,
    dtype: str = "float16",
    num_workers: int = 0,
    prefetch_factor: int = 2,
    context: str = "",
) -> int:
    """Run every batch of `dataset` through `enc` into `writer` (cast to `dtype`); returns the final (possibly
    halved) batch size. A tile that fails to decode raises `SlideError`; a non-finite embedding `FeatureError`."""
    state = _Batching(dataset.batch_size)
    loader = make_loader(dataset, num_workers=num_workers, device=enc.device, prefetch_factor=prefetch_factor)
    pending = None
    try:
        with torch.inference_mode(), Progress(dataset.stop - dataset.start, context or "encode") as progress:
            for tiles, row, error in loader:
                if error:
                    raise SlideError(error)
                emb = _encode_backoff(enc, tiles.to(enc.device, non_blocking=True), state)
                nxt = (*_to_host(emb), int(row))
                if pending is not None:
                    _consume(pending, writer, dtype, context)
                    progress.advance(len(pending[0]))
                pending = nxt
            if pending is not None:
                _consume(pending, writer, dtype, context)
                progress.advance(len(pending[0]))
    finally:
        dataset.close()
    writer.close()
    return state.size
