"""Planning a cohort's encode work: greedy LPT bin-packing of slides by tile count over devices (and over workflow
jobs), and splitting a huge slide into row ranges so several devices share it."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """Rows [start, stop) of one slide's tile table; `part` when the slide is split over several devices."""

    slide_id: str
    start: int
    stop: int
    n_tiles: int
    part: bool = False

    @property
    def rows(self) -> int:
        return self.stop - self.start


def lpt_assign(weights: list[float], n_bins: int) -> list[int]:
    """Greedy longest-processing-time: heaviest first, each to the least-loaded bin (ties: lowest index).

    Makespan <= (4/3 - 1/(3 n_bins)) x optimal (Graham 1969)."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0.0, b) for b in range(n_bins)]
    out = [0] * len(weights)
    for i in order:
        load, b = heapq.heappop(heap)
        out[i] = b
        heapq.heappush(heap, (load + weights[i], b))
    return out


def split_rows(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """`parts` contiguous ranges covering [0, n), inner boundaries on multiples of `align`, empty ones dropped."""
    align = max(1, align)
    cuts = [0] + [min(n, round(n * k / parts / align) * align) for k in range(1, parts)] + [n]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def plan_shards(
    tile_counts: Mapping[str, int], n_devices: int, *, split_threshold: int | None = None, align: int = 1
) -> list[list[Task]]:
    """Per-device task lists. A slide with more tiles than `split_threshold` (default: the fair share
    total / n_devices) is cut into up to `n_devices` row ranges aligned to `align` rows (use the batch size,
    so batches are the same as unsplit)."""
    total = sum(tile_counts.values())
    threshold = split_threshold if split_threshold is not None else math.ceil(total / max(n_devices, 1))
    tasks: list[Task] = []
    for sid in sorted(tile_counts):
        n = int(tile_counts[sid])
        parts = min(n_devices, math.ceil(n / max(threshold, 1))) if n_devices > 1 and n > threshold else 1
        ranges = split_rows(n, parts, align) if parts > 1 else [(0, n)]
        tasks += [Task(sid, a, b, n, part=len(ranges) > 1) for a, b in ranges]
    # Zero-tile slides still cost a little (an empty store): weigh them as one tile.
    bins = lpt_assign([max(t.rows, 1) for t in tasks], n_devices)
    plan: list[list[Task]] = [[] for _ in range(n_devices)]
    for task, b in zip(tasks, bins, strict=True):
        plan[b].append(task)
    for lst in plan:  # biggest first on each device: stragglers finish early
        lst.sort(key=lambda t: (-t.rows, t.slide_id, t.start))
    return plan
