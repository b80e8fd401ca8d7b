"""`wsi-pipeline encode` (one slide) and `encode-shard` (one workflow job of the cohort)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import RecordFailures, app, exit_with_error


@app.command()
def encode(
    slide: Annotated[str, typer.Argument(help="slide id, or the slide file (id = file name without extension)")],
    out: Annotated[Path, typer.Option("--out", help="results folder holding tiles/; features/ is written inside")],
    encoder: Annotated[
        str | None, typer.Option("--encoder", help="encoder name (default: config encoder.name)")
    ] = None,
    model_path: Annotated[str | None, typer.Option(help="local weights folder/file (encoder.path)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (its encoder/encode sections are used)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="tiles per batch (default 64)")] = None,
    num_workers: Annotated[int | None, typer.Option(help="tile-reading worker processes (0: inline)")] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu, cuda:N, or cuda (a free GPU picked by lock file under RESULTS/.gpu_locks)"),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="stored feature dtype: float16 or float32")] = None,
    force: Annotated[bool, typer.Option(help="re-encode even if a complete store exists")] = False,
    record_failures: RecordFailures = False,
) -> None:
    """Encode one slide's tiles: RESULTS/tiles/{id}.zarr -> RESULTS/features/{encoder}/{id}.zarr (+ .json)."""
    from ..config import load_config
    from ..devices import job_devices
    from ..encode.engine import encode_slide
    from ..errors import PipelineError
    from ..io.faults import describe_os_error
    from ..layout import STATUS_FAILED
    from ..slide.ids import default_slide_id

    try:
        cfg = load_config(config)
        enc_cfg = type(cfg.encoder).model_validate(
            {
                **cfg.encoder.model_dump(),
                **{k: v for k, v in {"name": encoder, "path": model_path}.items() if v is not None},
            }
        )
        params = cfg.encode.with_overrides(batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype)
        slide_id = default_slide_id(slide) if Path(slide).exists() else slide
        # "cuda" without an index: take a free GPU by lock file (Snakemake counts GPUs but does not assign them).
        with job_devices(out, params.device, 1) as devices:
            result = encode_slide(out, slide_id, enc_cfg, params, device=devices[0], force=force)
    except (PipelineError, ValueError) as err:
        exit_with_error(err)
    except OSError as err:  # a write the slide's sidecar could not record (see encode_whole_slide)
        exit_with_error(describe_os_error(err, out))
    if result.status == STATUS_FAILED and not record_failures:
        exit_with_error(result.reason)
    rate = f", {result.tiles_per_s} tiles/s" if result.tiles_per_s else ""
    typer.echo(
        f"{slide_id}: {result.status}{' (existing store kept)' if result.reused else ''}, "
        f"{result.n_tiles} tiles{rate}{': ' + result.reason if result.reason else ''}"
    )


@app.command("encode-shard")
def encode_shard(
    config: Annotated[Path, typer.Option(help="YAML config (the workflow passes RESULTS/settings/SCOPE-DIGEST.yaml)")],
    shard: Annotated[int, typer.Option(help="which shard, 0-based")] = 0,
    shards: Annotated[int, typer.Option(help="how many shards the cohort is split into")] = 1,
    out: Annotated[Path | None, typer.Option(help="summary JSON (default RESULTS/features/ENC/shards/...)")] = None,
) -> None:
    """Encode one shard of the cohort (what the Snakemake `encode` rule runs)."""
    from ..config import load_config
    from ..encode.jobs import run_encode_shard
    from ..errors import PipelineError
    from ..io.faults import describe_os_error
    from ..layout import ResultsLayout

    results: Path | None = None
    try:
        if not 0 <= shard < shards:
            raise PipelineError(f"--shard {shard} is outside 0..{shards - 1}; pass --shard in range of --shards")
        cfg = load_config(config)
        results = Path(cfg.results)
        out = out or ResultsLayout(results).encode_shard_summary(cfg.encoder.name, shard, shards)
        summary = run_encode_shard(results, list(cfg.cohort().index), cfg.encoder, cfg.encode, shard, shards, out)
    except PipelineError as err:
        exit_with_error(err)
    except OSError as err:  # disk full or read-only where the summary or a sidecar goes
        exit_with_error(describe_os_error(err, results, elsewhere="set results: in the config to another folder"))
    statuses = [s["status"] for s in summary["slides"].values()]
    typer.echo(
        f"shard {shard}/{shards}: {len(statuses)} slides on {','.join(summary['devices'])}: "
        + ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
    )
