"""`wsi-pipeline tile`: stage 1 for one slide."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .app import RecordFailures, app, exit_with_error

if TYPE_CHECKING:
    from ..layout import ResultsLayout
    from ..tiling.config import TilingParams, TissueParams
    from ..tiling.sidecar import TileSidecar


@app.command()
def tile(
    slide: Annotated[Path, typer.Argument(help="slide file, or a DICOM folder")],
    out: Annotated[Path, typer.Option("--out", help="results folder (tiles/ and qc/ are written inside)")],
    mpp: Annotated[float | None, typer.Option(help="override the slide's microns per pixel")] = None,
    tile_px: Annotated[int | None, typer.Option(help="tile side in pixels (default 256)")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="microns per pixel of tiles (default 0.5)")] = None,
    slide_id: Annotated[str | None, typer.Option(help="default: file name without extension")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (tiling/tissue sections are used)")] = None,
    record_failures: RecordFailures = False,
) -> None:
    """Tile one slide: tissue mask, tile grid, Zarr tile store, QC pictures."""
    from ..errors import PipelineError
    from ..io.faults import TILE_NEED, TILE_OUTPUT_BYTES, describe_os_error
    from ..layout import STATUS_FAILED
    from ..slide.ids import default_slide_id

    try:
        tiling, tissue, backend = _tile_sections(config)
        overrides = {k: v for k, v in {"tile_px": tile_px, "target_mpp": target_mpp}.items() if v is not None}
        tiling = type(tiling).model_validate({**tiling.model_dump(), **overrides})
        sid = slide_id or default_slide_id(slide)
        result = tile_under_lock(slide, out, sid, mpp, backend, tiling, tissue)
    except PipelineError as err:
        exit_with_error(err)
    except ValueError as err:  # pydantic validation of the overrides
        exit_with_error(f"invalid option: {err}")
    except OSError as err:  # the slide lock could not be taken: nothing was written
        exit_with_error(describe_os_error(err, out, need_bytes=TILE_OUTPUT_BYTES, need_what=TILE_NEED))
    if result.status == STATUS_FAILED and not record_failures:
        exit_with_error(result.reason)
    why = f" - {result.reason}" if result.reason else ""  # a recorded failure says why (the workflow's tile log)
    typer.echo(f"{result.slide_id}: {result.status}, {result.n_tiles} tiles{why}")


def _tile_sections(config: Path | None) -> tuple[TilingParams, TissueParams, str]:
    """The tiling, tissue and backend sections: a YAML file is validated whole (config.load_config); with none, the
    defaults come straight from the tiling models, so a tile job does not build every stage's config (~0.1 s)."""
    if config is None:
        from ..tiling.config import DEFAULT_BACKEND, TilingParams, TissueParams

        return TilingParams(), TissueParams(), DEFAULT_BACKEND
    from ..config import load_config

    cfg = load_config(config)
    return cfg.tiling, cfg.tissue, cfg.backend


def tile_under_lock(
    slide: Path,
    out: Path,
    slide_id: str,
    mpp: float | None,
    backend: str,
    tiling: TilingParams,
    tissue: TissueParams,
) -> TileSidecar:
    """Stage 1 for one slide holding `tiles/.locks/{slide_id}.lock`: two commands tiling one slide into one results
    folder take turns and both end with the same complete outputs. Disk faults are recorded by `tile_slide` itself
    (one line in the sidecar, or `StorageError` when not even that can be written). No temporary of the slide is
    left: under the lock none of them has a live writer."""
    from ..io.locks import file_lock
    from ..layout import ResultsLayout
    from ..slide.ids import slide_id_problem
    from ..tiling.stage import tile_slide

    layout = ResultsLayout(out)
    if slide_id_problem(slide_id):  # it would name the lock file: tile_slide refuses it before writing anything
        return tile_slide(slide, out, slide_id=slide_id, mpp=mpp, backend=backend, tiling=tiling, tissue=tissue)
    with file_lock(layout.tile_lock(slide_id)):
        try:
            return tile_slide(slide, out, slide_id=slide_id, mpp=mpp, backend=backend, tiling=tiling, tissue=tissue)
        finally:
            _remove_temporaries(layout, slide_id)


def _remove_temporaries(layout: ResultsLayout, slide_id: str) -> None:
    from ..io.atomic import remove_stale_temporaries, remove_stale_temporaries_in

    remove_stale_temporaries_in(layout.qc_dir(slide_id), own=True)
    for path in (layout.tile_store(slide_id), layout.tile_sidecar(slide_id)):
        remove_stale_temporaries(path, own=True)
