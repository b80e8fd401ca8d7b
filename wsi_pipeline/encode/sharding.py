"""A cohort over devices: the plan (`plan.py`: bin-packing by tile count, huge slides split into row ranges) run
with one process per device, split slides merged (`parts.py`).

`encode_slides` runs one process per device (spawned; in-process for one device) that builds the encoder once and
works through its bin. A split slide's parts are written as complete stores under `{slide_id}.parts/` (atomic,
each under its own lock, reused by a rerun: resumable) and merged, under the slide lock, by the parent.
Picking GPUs is `devices.py`.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..encoders import EncoderConfig
from ..errors import PipelineError
from ..io.faults import StorageError
from ..io.jsonio import write_json_atomic
from ..layout import STATUS_FAILED, ResultsLayout
from ..tiling.table import read_tile_attrs
from .config import EncodeParams
from .engine import (
    EncoderHandle,
    encode_whole_slide,
    expected_attrs,
    finished_slide,
    new_sidecar,
)
from .parts import encode_part, merge_parts
from .plan import Task, plan_shards
from .sidecar import EncodeSidecar
from .store import StoreLayout, is_complete_store

log = logging.getLogger(__name__)


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
        except StorageError:  # not even a sidecar can be written: the job stops with that one line
            raise
        except Exception as err:  # a bug on one slide must not stop the device's other slides
            if isinstance(err, PipelineError):  # a user-facing one-line failure: no traceback in the job log
                log.info("%s on %s: %s", task.slide_id, device, err)
                reason = str(err)
            else:
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
            # checked once here: finished_slide does not read the stores again; a missing or stale sidecar is
            # rewritten under the slide lock by encode_whole_slide (no model is built: it reuses the store)
            done = finished_slide(results, sid, encoder_cfg, params, complete_for=attrs)
            if done is None:
                handle = EncoderHandle(encoder_cfg, torch.device("cpu"))
                done = encode_whole_slide(results, sid, encoder_cfg, params, handle, force, layout)
            out[sid] = done
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
