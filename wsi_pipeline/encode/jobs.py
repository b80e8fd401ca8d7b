"""Stage 2 as workflow jobs: the cohort split into `encode.jobs` shards, each encoding its slides with one model
load per device.

Slides go to shards by tile count (greedy LPT over stage 1's sidecars, so every job of a run computes the same
assignment), then within a job across its devices by `encode_slides` (which also splits a huge slide). A job takes
`encode.gpus_per_job` GPUs (`devices.job_devices`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..devices import job_devices
from ..encoders import EncoderConfig
from ..io.jsonio import write_json_atomic
from ..layout import STATUS_OK, ResultsLayout
from .config import EncodeParams
from .plan import lpt_assign
from .sharding import encode_slides


def tile_counts(results: Path, slide_ids: Sequence[str]) -> dict[str, int]:
    """Tiles per slide from stage 1's sidecars (0 for failed or missing slides)."""
    layout = ResultsLayout(results)
    counts = {}
    for sid in slide_ids:
        sidecar = layout.tile_sidecar(sid)
        side = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        counts[sid] = int(side.get("n_tiles", 0)) if side.get("status") == STATUS_OK else 0
    return counts


def shard_slides(counts: dict[str, int], shard: int, n_shards: int) -> list[str]:
    """The slides of `shard` among `n_shards`, balanced by tile count (deterministic)."""
    ids = sorted(counts)
    bins = lpt_assign([float(counts[s]) for s in ids], n_shards)
    return [sid for sid, b in zip(ids, bins, strict=True) if b == shard]


def run_encode_shard(
    results: Path,
    slide_ids: Sequence[str],
    encoder: EncoderConfig,
    params: EncodeParams,
    shard: int,
    n_shards: int,
    out: Path,
) -> dict[str, Any]:
    """Encode one shard of the cohort and write a summary JSON to `out`; a bad slide is recorded, never raised."""
    started = time.perf_counter()
    mine = shard_slides(tile_counts(results, slide_ids), shard, n_shards)
    with job_devices(results, params.device, params.gpus_per_job) as devices:
        sidecars = encode_slides(results, mine, encoder, devices, params) if mine else {}
    summary = {
        "shard": shard,
        "n_shards": n_shards,
        "encoder": encoder.name,
        "devices": devices,
        "seconds": round(time.perf_counter() - started, 3),
        "slides": {
            sid: {k: getattr(side, k) for k in ("status", "reason", "n_tiles", "tiles_per_s")}
            for sid, side in sidecars.items()
        },
    }
    write_json_atomic(out, summary)
    return summary
