"""`wsi-pipeline tile`: stage 1 for one slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, exit_with_error


@app.command()
def tile(
    slide: Annotated[Path, typer.Argument(help="slide file, or a DICOM folder")],
    out: Annotated[Path, typer.Option("--out", help="results folder (tiles/ and qc/ are written inside)")],
    mpp: Annotated[float | None, typer.Option(help="override the slide's microns per pixel")] = None,
    tile_px: Annotated[int | None, typer.Option(help="tile side in pixels (default 256)")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="microns per pixel of tiles (default 0.5)")] = None,
    slide_id: Annotated[str | None, typer.Option(help="default: file name without extension")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (tiling/tissue sections are used)")] = None,
    record_failures: Annotated[
        bool, typer.Option(help="record a bad slide in its sidecar and exit 0 (what a cohort run does)")
    ] = False,
) -> None:
    """Tile one slide: tissue mask, tile grid, Zarr tile store, QC pictures."""
    from ..config import load_config
    from ..errors import PipelineError
    from ..layout import STATUS_FAILED
    from ..tiling.stage import tile_slide

    try:
        cfg = load_config(config)
        overrides = {k: v for k, v in {"tile_px": tile_px, "target_mpp": target_mpp}.items() if v is not None}
        tiling = type(cfg.tiling).model_validate({**cfg.tiling.model_dump(), **overrides})
        result = tile_slide(
            slide, out, slide_id=slide_id, mpp=mpp, backend=cfg.backend, tiling=tiling, tissue=cfg.tissue
        )
    except PipelineError as err:
        exit_with_error(err)
    except ValueError as err:  # pydantic validation of the overrides
        exit_with_error(f"invalid option: {err}")
    if result.status == STATUS_FAILED and not record_failures:
        exit_with_error(result.reason)
    typer.echo(f"{result.slide_id}: {result.status}, {result.n_tiles} tiles")
