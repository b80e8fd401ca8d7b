"""`wsi-pipeline`: the command line. Each verb does for one slide exactly what its Snakemake rule does."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import PipelineError, exit_with_error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-slide images in; tiles, embeddings, MIL models and explanations out.")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(__version__)


@app.command()
def tile(
    slide: Annotated[Path, typer.Argument(help="slide file, or a DICOM folder")],
    out: Annotated[Path, typer.Option("--out", help="results folder (tiles/ and qc/ are written inside)")],
    mpp: Annotated[float | None, typer.Option(help="override the slide's microns per pixel")] = None,
    tile_px: Annotated[int | None, typer.Option(help="tile side in pixels (default 256)")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="microns per pixel of tiles (default 0.5)")] = None,
    slide_id: Annotated[str | None, typer.Option(help="default: file name without extension")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (tiling/tissue sections are used)")] = None,
    record_failures: Annotated[bool, typer.Option(
        help="record a bad slide in its sidecar and exit 0 (what a cohort run does)")] = False,
) -> None:
    """Tile one slide: tissue mask, tile grid, Zarr tile store, QC pictures."""
    from .config import load_config
    from .tile_stage import STATUS_FAILED, tile_slide

    try:
        cfg = load_config(config) if config else load_config({})
        tiling = cfg.tiling.model_copy(update={k: v for k, v in
                                               {"tile_px": tile_px, "target_mpp": target_mpp}.items()
                                               if v is not None})
        tiling = type(tiling).model_validate(tiling.model_dump())
        result = tile_slide(slide, out, slide_id=slide_id, mpp=mpp, backend=cfg.backend, tiling=tiling,
                            tissue=cfg.tissue)
    except PipelineError as err:
        exit_with_error(err)
        return
    except ValueError as err:  # pydantic validation of the overrides
        exit_with_error(PipelineError(f"invalid option: {err}"))
        return
    if result["status"] == STATUS_FAILED and not record_failures:
        exit_with_error(PipelineError(result["reason"]))
    typer.echo(f"{result['slide_id']}: {result['status']}, {result['n_tiles']} tiles")


def _register_stage_commands() -> None:
    from .encode_jobs import encode_shard_command
    from .encode_stage import encode_command
    from .mil import commands as mil_commands
    from .mil import workflow as mil_workflow

    app.command("encode")(encode_command)
    app.command("encode-shard")(encode_shard_command)
    app.command("train")(mil_commands.train)
    app.command("predict")(mil_commands.predict)
    app.command("bench-mil")(mil_commands.bench_mil)
    app.command("mil-sheet")(mil_workflow.mil_sheet_command)
    app.command("mil-splits")(mil_workflow.mil_splits_command)
    app.command("mil-train")(mil_workflow.mil_train_command)
    app.command("mil-evaluate")(mil_workflow.mil_evaluate_command)


_register_stage_commands()


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results folder holding tiles/*.json")],
    encoder: Annotated[str | None, typer.Option(help="also report features/ENCODER/*.json")] = None,
    fail_on_error: Annotated[bool, typer.Option(help="exit 1 if any slide failed")] = False,
) -> None:
    """Write results/report.csv and report.html from the per-slide sidecars; print failed slides."""
    from .qc import build_report, failure_summary

    sidecars = sorted((results / "tiles").glob("*.json"))
    table = build_report(sidecars, results, encoder=encoder)
    typer.echo(failure_summary(table))
    if fail_on_error and ((table["status"] == "failed") | (table["encode_status"] == "failed")).any():
        raise typer.Exit(code=1)


@app.command("export-h5")
def export_h5_cmd(
    results: Annotated[Path, typer.Argument(help="results folder")],
    out: Annotated[Path, typer.Option("--out", help="folder for the .h5 files")],
    slide_id: Annotated[list[str] | None, typer.Option(help="only these slides (repeatable)")] = None,
) -> None:
    """Export tile coordinates as CLAM/TRIDENT-style HDF5 (`coords` with their attributes)."""
    from .export import export_h5

    stores = sorted((results / "tiles").glob("*.zarr"))
    if slide_id:
        stores = [s for s in stores if s.stem in set(slide_id)]
    if not stores:
        exit_with_error(PipelineError(f"{results}/tiles: no tile stores found; run `wsi-pipeline tile` first"))
    for store in stores:
        path = export_h5(store, out / "patches" / f"{store.stem}.h5")
        typer.echo(str(path))


@app.command()
def schema(out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None) -> None:
    """Print the JSON schema of the config (workflows/schemas/config.schema.json is generated by this)."""
    from .config import config_json_schema

    text = json.dumps(config_json_schema(), indent=2) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


def main() -> None:  # pragma: no cover - console entry point
    app()
