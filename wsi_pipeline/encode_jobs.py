"""Stage 2 as workflow jobs: the cohort split into `encode.jobs` shards, each encoding its slides with one model
load per device.

Slides go to shards by tile count (greedy LPT over stage 1's sidecars, so every job of a run computes the same
assignment), then within a job across its devices by `encode_slides` (which also splits a huge slide). A job takes
`encode.gpus_per_job` GPUs: on a workstation it locks free ones (Snakemake's `--resources gpu=N` counts GPUs but
does not assign them); under a cluster executor it uses the ones it was given (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import PipelineConfig, load_config
from .errors import PipelineError
from .store import write_json_atomic


def tile_counts(results: Path, slide_ids: Sequence[str]) -> dict[str, int]:
    """Tiles per slide from stage 1's sidecars (0 for failed or missing slides)."""
    counts = {}
    for sid in slide_ids:
        sidecar = results / "tiles" / f"{sid}.json"
        side = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        counts[sid] = int(side.get("n_tiles", 0)) if side.get("status") == "ok" else 0
    return counts


def shard_slides(counts: dict[str, int], shard: int, n_shards: int) -> list[str]:
    """The slides of `shard` among `n_shards`, balanced by tile count (deterministic)."""
    from .sharding import lpt_assign

    ids = sorted(counts)
    bins = lpt_assign([float(counts[s]) for s in ids], n_shards)
    return [sid for sid, b in zip(ids, bins, strict=True) if b == shard]


@contextlib.contextmanager
def job_devices(results: Path, device: str, gpus: int) -> Iterator[list[str]]:
    """The devices this job may use: `gpus` locked GPUs when the device is cuda/auto on a GPU machine, else CPU."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        yield ["cpu"]
        return
    if device.startswith("cuda:"):
        yield [device]
        return
    from .sharding import acquire_gpu, visible_gpus

    visible = visible_gpus()
    if visible is not None and 1 <= len(visible) <= gpus:  # a cluster executor gave us exactly our GPUs
        yield [f"cuda:{i}" for i in range(len(visible))]
        return
    with contextlib.ExitStack() as stack:
        ids = [stack.enter_context(acquire_gpu(results)) for _ in range(gpus)]
        yield [f"cuda:{i}" for i in ids]


def run_encode_shard(cfg: PipelineConfig, shard: int, n_shards: int, out: Path) -> dict[str, Any]:
    """Encode one shard of the cohort and write a summary JSON to `out`; a bad slide is recorded, never raised."""
    from .sharding import encode_slides

    started = time.perf_counter()
    results = Path(cfg.results)
    slide_ids = list(cfg.cohort().index)
    mine = shard_slides(tile_counts(results, slide_ids), shard, n_shards)
    p = cfg.encode
    with job_devices(results, p.device, p.gpus_per_job) as devices:
        sidecars = encode_slides(results, mine, cfg.encoder, devices, batch_size=p.batch_size,
                                 num_workers=p.num_workers, dtype=p.dtype, prefetch_factor=p.prefetch_factor,
                                 split_threshold=p.split_threshold) if mine else {}
    summary = {
        "shard": shard, "n_shards": n_shards, "encoder": cfg.encoder.name, "devices": devices,
        "seconds": round(time.perf_counter() - started, 3),
        "slides": {sid: {k: side.get(k) for k in ("status", "reason", "n_tiles", "tiles_per_s")}
                   for sid, side in sidecars.items()},
    }
    write_json_atomic(out, summary)
    return summary


def encode_shard_command(
    config: Annotated[Path, typer.Option(help="the run's YAML config (Snakemake writes RESULTS/run_config.yaml)")],
    shard: Annotated[int, typer.Option(help="which shard, 0-based")] = 0,
    shards: Annotated[int, typer.Option(help="how many shards the cohort is split into")] = 1,
    out: Annotated[Path | None, typer.Option(help="summary JSON (default RESULTS/features/ENC/shards/...)")] = None,
) -> None:
    """Encode one shard of the cohort (what the Snakemake `encode` rule runs)."""
    try:
        if not 0 <= shard < shards:
            raise PipelineError(f"--shard {shard} is outside 0..{shards - 1}; pass --shard in range of --shards")
        cfg = load_config(config)
        out = out or Path(cfg.results) / "features" / cfg.encoder.name / "shards" / f"{shard}-of-{shards}.json"
        summary = run_encode_shard(cfg, shard, shards, out)
    except PipelineError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    statuses = [s["status"] for s in summary["slides"].values()]
    typer.echo(f"shard {shard}/{shards}: {len(statuses)} slides on {','.join(summary['devices'])}: "
               + ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))))


def write_run_config(cfg_dict: dict[str, Any], path: Path) -> Path:
    """Write the effective config (after all overrides) for the jobs to read; untouched when unchanged so that
    Snakemake sees no newer input."""
    import yaml

    text = yaml.safe_dump(cfg_dict, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path
