"""The stage-2 sidecar `features/{encoder}/{slide_id}.json` as a typed model, written for every slide."""

from __future__ import annotations

import os

from ..io.sidecar import Sidecar
from ..layout import STATUS_FAILED, STATUS_OK


class EncodeSidecar(Sidecar):
    """Status ("ok", "no tissue", "skipped" or "failed") with the reason, where and how fast the slide ran."""

    slide_id: str
    encoder: str
    status: str = STATUS_FAILED
    reason: str = ""
    n_tiles: int = 0
    device: str = "cpu"
    batch_size: int
    num_workers: int
    dtype: str
    store: str | None = None  # relative to the results folder
    reused: bool = False  # an existing complete store was kept
    package_version: str
    batch_size_final: int | None = None  # after halving on CUDA out-of-memory
    model_load_seconds: float | None = None
    parts: int | None = None  # row ranges the slide was split into across devices
    seconds: float | None = None  # model loading excluded
    tiles_per_s: float | None = None
    warnings: list[str] = []  # results to check by eye (e.g. a brightfield encoder on a fluorescence slide)

    def finish(self, seconds: float, path: str | os.PathLike[str]) -> EncodeSidecar:
        """Record the time and throughput, then write the sidecar to `path`."""
        self.seconds = round(seconds, 3)
        self.tiles_per_s = round(self.n_tiles / seconds, 2) if self.status == STATUS_OK and seconds > 0 else None
        self.write(path)
        return self
