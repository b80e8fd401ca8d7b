"""A slide split over several devices: each row range is encoded into its own part store (atomic, under its own lock,
reused by a rerun: resumable), then the parts are merged, in row order, into the slide's final store."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..encoders import EncoderConfig
from ..errors import FeatureError, PipelineError
from ..io.atomic import atomic_group, remove_stale_temporaries
from ..io.locks import file_lock
from ..io.zarr_access import attrs_dict, zarr_array
from ..layout import STATUS_FAILED, STATUS_OK, ResultsLayout
from ..tiling.table import TileTable
from .config import EncodeParams
from .engine import (
    EncoderHandle,
    SkipSlide,
    expected_attrs,
    load_tile_table,
    new_sidecar,
    write_feature_store,
)
from .plan import Task
from .sidecar import EncodeSidecar
from .store import ShardWriter, StoreLayout, create_feature_arrays, is_complete_store, plan_layout

log = logging.getLogger(__name__)


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
        g.update_attributes(attrs)
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
