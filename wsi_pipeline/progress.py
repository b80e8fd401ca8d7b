"""Progress of long work (tiles encoded, slides done): a live bar on a terminal, a plain log line every so often
otherwise (Snakemake and SLURM job logs), with the rate and the time left either way."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("wsi_pipeline.progress")

LOG_EVERY_S = 30.0  # a line per half minute keeps a job log readable on a 10-hour slide


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """`with Progress(total, "demo_000: tiles") as p: p.advance(n)` — a rich bar when stderr is a terminal,
    else an INFO log line (logger `wsi_pipeline.progress`) at most every `every_s` seconds and at the end."""

    def __init__(self, total: int, label: str, *, every_s: float = LOG_EVERY_S, unit: str = "tiles") -> None:
        self.total, self.label, self.every_s, self.unit = int(total), label, every_s, unit
        self.done = 0
        self.started = self.last_log = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty() and self.total > 0:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
        return self

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate:.1f} {self.unit}/s")
        elif time.monotonic() - self.last_log >= self.every_s:
            self.last_log = time.monotonic()
            self._log()

    def _log(self) -> None:
        left = (self.total - self.done) / self.rate if self.rate > 0 else float("inf")
        log.info(
            "%s: %d/%d %s, %.1f %s/s, %s left",
            self.label,
            self.done,
            self.total,
            self.unit,
            self.rate,
            self.unit,
            _eta(left),
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc_type is None and self.total > 0:
            self._log()
