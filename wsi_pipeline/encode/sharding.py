"""Spreading encode work over devices: greedy LPT bin-packing by tile count, splitting a huge slide into row
ranges (per-part stores merged into the final store), one process per device, and picking a free GPU.

`encode_slides` runs one process per device (spawned; in-process for one device) that builds the encoder once and
works through its bin. A split slide's parts are written as complete stores under `{slide_id}.parts/` (atomic,
each under its own lock, reused by a rerun: resumable) and merged, under the slide lock, by the parent.
Picking GPUs is `devices.py`.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import queue as queue_mod
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ..devices import resolve_device
from ..encoders import EncoderConfig
from ..errors import FeatureError, PipelineError
from ..io.atomic import atomic_group, remove_stale_temporaries
from ..io.jsonio import write_json_atomic
from ..io.locks import file_lock
from ..io.zarr_access import attrs_dict, zarr_array
from ..layout import STATUS_FAILED, STATUS_OK, ResultsLayout
from ..tiling.table import TileTable, read_tile_attrs
from .config import EncodeParams
from .engine import (
    EncoderHandle,
    SkipSlide,
    encode_whole_slide,
    expected_attrs,
    load_tile_table,
    new_sidecar,
    write_feature_store,
)
from .sidecar import EncodeSidecar
from .store import ShardWriter, StoreLayout, create_feature_arrays, is_complete_store, plan_layout

log = logging.getLogger(__name__)


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


# --- split slides: per-part stores, merged under the slide lock ------------------------------------------------


def part_path(results: Path, encoder: str, task: Task) -> Path:
    parts = ResultsLayout(results).feature_parts(encoder, task.slide_id)
    return parts / f"{task.start:010d}-{task.stop:010d}.zarr"


def part_lock(results: Path, encoder: str, task: Task) -> Path:
    # Beside the slide locks, never inside the parts folder, and never deleted: unlinking a lock file that
    # another process has opened would let two holders lock two different files.
    lock = ResultsLayout(results).feature_lock(encoder, task.slide_id)
    return lock.with_name(f"{task.slide_id}.part-{task.start}-{task.stop}.lock")


def encode_part(
    results: Path,
    task: Task,
    cfg: EncoderConfig,
    params: EncodeParams,
    handle: EncoderHandle,
    force: bool = False,
    layout: StoreLayout | None = None,
) -> dict[str, Any]:
    """Rows [task.start, task.stop) into a part store (kept when complete, so a rerun resumes from it)."""
    path = part_path(results, cfg.name, task)
    started = time.perf_counter()
    res: dict[str, Any] = {"status": STATUS_OK, "reason": "", "device": str(handle.device)}
    with file_lock(part_lock(results, cfg.name, task)):
        try:
            table = load_tile_table(results, task.slide_id)
            extra = {"part_start": task.start, "part_stop": task.stop}
            expect = {**expected_attrs(cfg, params.dtype, table.attrs), **extra}
            if force or not is_complete_store(path, expect):
                remove_stale_temporaries(path)
                res["batch_size_final"] = write_feature_store(
                    path, task.slide_id, table, task.start, task.stop, cfg, handle, params, results, extra, layout
                )
        except (SkipSlide, PipelineError) as err:
            res.update(status=STATUS_FAILED, reason=str(err))
    res["seconds"] = round(time.perf_counter() - started, 3)
    return res


def merge_parts(
    results: Path,
    slide_id: str,
    tasks: list[Task],
    part_results: list[dict[str, Any]],
    cfg: EncoderConfig,
    params: EncodeParams,
    force: bool = False,
    layout: StoreLayout | None = None,
) -> EncodeSidecar:
    """Publish a split slide: copy its part stores, in row order, into the final store; write the sidecar."""
    paths = ResultsLayout(results)
    store = paths.feature_store(cfg.name, slide_id)
    side = new_sidecar(slide_id, cfg, "cpu", params)
    side.device = ",".join(sorted({str(r.get("device", "?")) for r in part_results}))
    side.parts = len(tasks)
    started = time.perf_counter()
    tasks = sorted(tasks, key=lambda t: t.start)
    with file_lock(paths.feature_lock(cfg.name, slide_id)):
        try:
            table = load_tile_table(results, slide_id)
            side.n_tiles = len(table)
            bad = [r for r in part_results if r["status"] != STATUS_OK]
            if bad:
                raise FeatureError(bad[0]["reason"])
            if force or not is_complete_store(store, expected_attrs(cfg, params.dtype, table.attrs)):
                remove_stale_temporaries(store)
                side.batch_size_final = _merge(
                    store, [part_path(results, cfg.name, t) for t in tasks], table, params, layout
                )
            side.status, side.store = STATUS_OK, paths.rel(store)
        except (SkipSlide, PipelineError) as err:
            side.status, side.reason = STATUS_FAILED, str(err)
        # Encoding time is the slowest part's (the parts ran in parallel) plus the merge.
        slowest = max((r.get("seconds", 0.0) for r in part_results), default=0.0)
        side.finish(slowest + time.perf_counter() - started, paths.feature_sidecar(cfg.name, slide_id))
    _remove_parts(paths.feature_parts(cfg.name, slide_id), tasks, results, cfg.name)
    return side


def _merge(final: Path, parts: list[Path], table: TileTable, params: EncodeParams, layout: StoreLayout | None) -> int:
    groups = [zarr.open_group(str(p), mode="r") for p in parts]
    dim = int(zarr_array(groups[0], "features").shape[1])
    n = len(table)
    layout = layout or plan_layout(n, dim, params.dtype)
    with atomic_group(final) as g:
        feats, coords = create_feature_arrays(g, n, dim, params.dtype, layout)
        cw, fw = ShardWriter(coords), ShardWriter(feats)
        for pg in groups:  # stream shard-sized blocks: memory stays one shard
            pf, pc = zarr_array(pg, "features"), zarr_array(pg, "coords")
            for i in range(0, pf.shape[0], layout.shard_rows):
                fw.append(np.asarray(pf[i : i + layout.shard_rows]))
                cw.append(np.asarray(pc[i : i + layout.shard_rows]))
        fw.close()
        cw.close()
        if not np.array_equal(np.asarray(coords[...]), table.coords):
            raise FeatureError(f"{final}: merged coords differ from the tile table; rerun with --force")
        attrs = {k: v for k, v in dict(groups[0].attrs).items() if k not in ("part_start", "part_stop")}
        final_batch = min(int(attrs_dict(pg).get("batch_size_final", params.batch_size)) for pg in groups)
        attrs.update(
            n_tiles=n, layout=layout.to_dict(), batch_size_final=final_batch, merged_parts=len(parts), complete=True
        )
        g.attrs.update(attrs)
    return final_batch


def _remove_parts(parts_dir: Path, tasks: list[Task], results: Path, encoder: str) -> None:
    for t in tasks:
        p = part_path(results, encoder, t)
        with file_lock(part_lock(results, encoder, t), blocking=False) as held:
            if held:  # never delete a part another run is writing
                shutil.rmtree(p, ignore_errors=True)
                remove_stale_temporaries(p)
    try:
        parts_dir.rmdir()
    except OSError:
        pass


# --- one process per device ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceWork:
    """What every device process needs besides its task list (picklable: sent to spawned processes)."""

    results: Path
    encoder: dict[str, Any]  # EncoderConfig.model_dump()
    params: EncodeParams
    force: bool
    layout: StoreLayout | None


def _failed_slide(
    work: DeviceWork, cfg: EncoderConfig, slide_id: str, device: str, n_tiles: int, reason: str
) -> EncodeSidecar:
    side = new_sidecar(slide_id, cfg, device, work.params)
    side.n_tiles, side.reason = n_tiles, reason
    return side.finish(0.0, ResultsLayout(work.results).feature_sidecar(cfg.name, slide_id))


def _run_device(
    device: str, tasks: list[Task], work: DeviceWork, report: Callable[[Task, dict[str, Any] | EncodeSidecar], None]
) -> dict[str, Any]:
    """Work through one device's bin with one encoder (built on first need); report each task's result."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # so library calls without an explicit device land on ours
    cfg = EncoderConfig.model_validate(work.encoder)
    handle = EncoderHandle(cfg, dev)
    for task in tasks:
        res: dict[str, Any] | EncodeSidecar
        try:
            if task.part:
                res = encode_part(work.results, task, cfg, work.params, handle, work.force, work.layout)
            else:
                res = encode_whole_slide(work.results, task.slide_id, cfg, work.params, handle, work.force, work.layout)
        except Exception as err:  # a bug on one slide must not stop the device's other slides
            log.exception("%s on %s", task.slide_id, device)
            reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
            if task.part:
                res = {"status": STATUS_FAILED, "reason": reason, "device": device}
            else:
                res = _failed_slide(work, cfg, task.slide_id, device, task.n_tiles, reason)
        report(task, res)
    return {
        "device": device,
        "pid": os.getpid(),
        "model_loads": handle.builds,
        "model_load_seconds": round(handle.load_seconds, 3),
        "tasks": len(tasks),
    }


def _device_main(rank: int, device: str, tasks: list[Task], work: DeviceWork, threads: int | None, q: Any) -> None:
    if threads:
        torch.set_num_threads(threads)
    summary = _run_device(device, tasks, work, lambda t, r: q.put(("task", t, r)))
    q.put(("done", rank, summary))


def encode_slides(
    results: str | Path,
    slide_ids: Sequence[str],
    encoder_cfg: EncoderConfig,
    devices: Sequence[str | torch.device] = ("auto",),
    params: EncodeParams | None = None,
    *,
    force: bool = False,
    layout: StoreLayout | None = None,
    **overrides: Any,
) -> dict[str, EncodeSidecar]:
    """Encode a cohort over `devices` (e.g. ["cuda:0", "cuda:1"]; CPU entries work the same), one process and one
    model load per device, slides bin-packed by tile count and big ones split. Returns {slide_id: sidecar}.

    `params` is the `encode:` section (default `EncodeParams(num_workers=0)`); fields may be overridden by name."""
    results = Path(results)
    params = (params or EncodeParams(num_workers=0)).with_overrides(**overrides)
    devs = [str(resolve_device(d)) for d in devices] or ["cpu"]
    work = DeviceWork(results, encoder_cfg.model_dump(), params, force, layout)
    paths = ResultsLayout(results)
    out: dict[str, EncodeSidecar] = {}
    counts: dict[str, int] = {}
    for sid in dict.fromkeys(slide_ids):
        attrs = read_tile_attrs(paths.tile_store(sid))
        store = paths.feature_store(encoder_cfg.name, sid)
        if (
            attrs is not None
            and not force
            and is_complete_store(store, expected_attrs(encoder_cfg, params.dtype, attrs))
        ):
            handle = EncoderHandle(encoder_cfg, torch.device("cpu"))  # reuses the store: no model is built
            out[sid] = encode_whole_slide(results, sid, encoder_cfg, params, handle, force, layout)
        else:
            counts[sid] = int(attrs.get("n_tiles", 0)) if attrs else 0
    plan = plan_shards(counts, len(devs), split_threshold=params.split_threshold, align=params.batch_size)
    reports: list[tuple[Task, Any]] = []
    summaries = _run_all(devs, plan, work, reports)
    parts: dict[str, list[tuple[Task, dict[str, Any]]]] = {}
    for task, res in reports:
        if task.part:
            parts.setdefault(task.slide_id, []).append((task, res))
        else:
            out[task.slide_id] = res
    for sid, lst in parts.items():
        planned = [t for bin_ in plan for t in bin_ if t.slide_id == sid]
        got = {t for t, _ in lst}
        lost = [
            {"status": STATUS_FAILED, "reason": f"rows {t.start}-{t.stop}: worker process died"}
            for t in planned
            if t not in got
        ]
        out[sid] = merge_parts(results, sid, planned, [r for _, r in lst] + lost, encoder_cfg, params, force, layout)
    for sid in counts:
        if sid not in out:  # its device's process died before reporting
            dead = [s for s in summaries if s.get("exitcode")]
            reason = f"worker process exited abnormally ({dead[0] if dead else 'no report'})"
            out[sid] = _failed_slide(work, encoder_cfg, sid, "cpu", counts[sid], reason)
    write_json_atomic(paths.encode_devices_log(encoder_cfg.name), summaries)
    return {sid: out[sid] for sid in dict.fromkeys(slide_ids)}


def _run_all(
    devs: list[str], plan: list[list[Task]], work: DeviceWork, reports: list[tuple[Task, Any]]
) -> list[dict[str, Any]]:
    if len(devs) == 1:
        return [_run_device(devs[0], plan[0], work, lambda t, r: reports.append((t, r)))]
    ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked; spawn is safe everywhere
    q = ctx.Queue()
    n_cpu = sum(d == "cpu" for d in devs)
    threads = max(1, (os.cpu_count() or 1) // max(n_cpu, 1))  # CPU "devices" share the cores
    procs = {
        rank: ctx.Process(
            target=_device_main, args=(rank, d, plan[rank], work, threads if d == "cpu" else None, q), daemon=False
        )
        for rank, d in enumerate(devs)
        if plan[rank]
    }
    for p in procs.values():
        p.start()
    summaries: dict[int, dict[str, Any]] = {}
    while True:
        try:
            msg = q.get(timeout=0.5)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs.values()):
                break
            continue
        if msg[0] == "task":
            reports.append((msg[1], msg[2]))
        else:
            summaries[msg[1]] = msg[2]
    for rank, p in procs.items():
        p.join()
        summaries.setdefault(rank, {"device": devs[rank], "model_loads": None})["exitcode"] = p.exitcode
    return [summaries[rank] for rank in procs]
