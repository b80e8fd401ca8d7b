"""Stage 1 for one slide: open, mask tissue, lay the tile grid, write the tile store, QC pictures and a sidecar.

The sidecar `tiles/{slide_id}.json` is written last and always (status "ok", "no tissue" or "failed" with the
reason), so a cohort run records a bad slide and carries on; the Zarr store is only ever complete or absent.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ConfigError, PipelineError
from ..io.atomic import remove_stale_temporaries
from ..io.faults import TILE_NEED, TILE_OUTPUT_BYTES, StorageError, describe_os_error
from ..layout import STATUS_FAILED, STATUS_NO_TISSUE, STATUS_OK, ResultsLayout
from ..slide.fingerprint import slide_fingerprint
from ..slide.ids import default_slide_id, slide_id_problem
from ..slide.reader import Slide, open_slide
from .config import TilingParams, TissueParams
from .geometry import TileGeometry, grid_coords, plan_geometry
from .modality import background_rgb, colour_warning, detect_modality
from .qc import draw_qc_thumbnail, qc_mpp_for, write_png
from .sidecar import TileSidecar
from .table import write_tile_table
from .tissue import TissueMask, compute_tissue_mask, write_geojson, write_mask_png

log = logging.getLogger(__name__)


def tile_slide(
    path: str | os.PathLike[str],
    results: str | os.PathLike[str],
    *,
    slide_id: str | None = None,
    mpp: float | None = None,
    backend: str = "auto",
    tiling: TilingParams | None = None,
    tissue: TissueParams | None = None,
) -> TileSidecar:
    """Tile one slide into `results`; never raises for a bad slide: the returned sidecar says what happened."""
    tiling = tiling or TilingParams()
    tissue = tissue or TissueParams()
    slide_id = slide_id or default_slide_id(path)
    if problem := slide_id_problem(slide_id):  # it names files and jobs: refused before anything is written
        raise ConfigError(f"{path}: {problem}; pass --slide-id {default_slide_id(slide_id)}")
    layout = ResultsLayout(results)
    started = time.perf_counter()
    disk_fault: str | None = None
    sidecar = TileSidecar(
        slide_id=slide_id,
        path=str(path),
        package_version=__version__,
        tiling=tiling.model_dump(),
        tissue_params=tissue.model_dump(),
        mpp_override=mpp,
    )
    try:
        # Taken before reading: a failed slide replaced by a good copy (even with its old date) is tried again.
        sidecar.slide_fingerprint = slide_fingerprint(path) if Path(path).exists() else None
        with open_slide(path, backend=backend, mpp=mpp) as slide:  # type: ignore[arg-type]
            sidecar.slide = slide.info.to_dict()
            result = _tile_open_slide(slide, layout, slide_id, tiling, tissue, sidecar.slide_fingerprint)
            for key, value in result.items():
                setattr(sidecar, key, value)
    except PipelineError as err:
        sidecar.status, sidecar.reason, sidecar.n_tiles = STATUS_FAILED, str(err), 0
        log.info("%s: failed: %s", slide_id, err)
    except OSError as err:  # disk full, read-only, a file in the way: recorded like a bad slide, the cohort goes on
        disk_fault = describe_os_error(err, results, need_bytes=TILE_OUTPUT_BYTES, need_what=TILE_NEED)
        sidecar.status, sidecar.reason, sidecar.n_tiles = STATUS_FAILED, disk_fault, 0
        log.info("%s: failed: %s", slide_id, disk_fault)
    sidecar.seconds = round(time.perf_counter() - started, 3)
    try:
        sidecar.write(layout.tile_sidecar(slide_id))
    except OSError as err:  # not even the sidecar can be written: the one line goes to the caller
        raise StorageError(disk_fault or describe_os_error(err, results)) from None
    return sidecar


def _tile_open_slide(
    slide: Slide,
    layout: ResultsLayout,
    slide_id: str,
    tiling: TilingParams,
    tissue: TissueParams,
    fingerprint: dict[str, Any] | None,
) -> dict[str, Any]:
    geometry = plan_geometry(slide, tiling)
    width, height = slide.info.dimensions
    qc_mpp = qc_mpp_for(width, height, geometry.slide_mpp)
    # One low-resolution read serves both the mask and the QC picture.
    base, base_scale = slide.thumbnail_at_mpp(min(qc_mpp, tissue.mask_mpp))
    mask_img, mask_scale = _shrink_to(base, base_scale, tissue.mask_mpp / geometry.slide_mpp)
    qc_img, qc_scale = _shrink_to(base, base_scale, qc_mpp / geometry.slide_mpp)
    qc_dir = layout.qc_dir(slide_id)
    qc_dir.mkdir(parents=True, exist_ok=True)
    # PNG encoding releases the GIL: the two thumbnails (~0.08 s each at 2048 px) are encoded side by side on threads
    # once the mask is done, while this thread writes the GeoJSON and the tile table. Encoding the plain one during
    # the mask instead was slower: the mask then shares a core and the drawn one still ends last, alone.
    with ThreadPoolExecutor(3) as pool:
        pictures: list[Future[Any]] = []
        modality = detect_modality(mask_img) if tissue.modality == "auto" else tissue.modality
        mask = compute_tissue_mask(mask_img, mask_scale * geometry.slide_mpp, tissue, modality)
        # Brightfield glass is near-neutral: strongly coloured glass means the colours were read wrongly.
        glass = background_rgb(mask_img, mask.mask) if modality == "brightfield" else None
        warnings = [w for w in (colour_warning(glass),) if w]
        for w in warnings:
            log.warning("%s: %s", slide_id, w)
        pictures.append(pool.submit(write_mask_png, mask, qc_dir / "mask.png"))

        coords = grid_coords(width, height, geometry)
        fractions = _tile_fractions(mask, coords, geometry, mask_scale)
        keep = fractions >= tiling.min_tissue_fraction if tiling.min_tissue_fraction > 0 else np.ones(len(coords), bool)
        coords, fractions = coords[keep], fractions[keep]
        status = STATUS_OK if len(coords) else STATUS_NO_TISSUE

        rings = [np.asarray(ring, dtype=np.float64) * mask_scale for poly in mask.contours for ring in _rings(poly)]
        pictures.append(pool.submit(write_png, qc_dir / "thumbnail_plain.png", qc_img))
        pictures.append(
            pool.submit(
                lambda: write_png(
                    qc_dir / "thumbnail.png",
                    draw_qc_thumbnail(qc_img, qc_scale, rings, coords, geometry.tile_size_level0),
                )
            )
        )
        write_geojson(mask, qc_dir / "tissue.geojson", level0_scale=mask_scale, slide_id=slide_id)
        store = layout.tile_store(slide_id)
        remove_stale_temporaries(store)
        attrs = _store_attrs(slide, geometry, slide_id, mask, tissue, tiling, status) | {
            "slide_fingerprint": fingerprint,
            "modality": modality,
            "background_rgb": glass,
            "warnings": warnings,
        }
        write_tile_table(store, coords, fractions, attrs)
        for done in pictures:
            done.result()  # a failed picture fails the slide, as before
    return {
        "status": status,
        "reason": "no tissue found by the mask" if status == STATUS_NO_TISSUE else "",
        "n_tiles": int(len(coords)),
        "tissue_area_mm2": float(mask.area_mm2),
        "modality": modality,
        "background_rgb": list(glass) if glass else None,
        "warnings": warnings,
        "geometry": geometry.to_dict(),
        "store": layout.rel(store),
        "qc": {
            "thumbnail": layout.rel(qc_dir / "thumbnail.png"),
            "thumbnail_plain": layout.rel(qc_dir / "thumbnail_plain.png"),  # no drawings: base for heatmaps
            "mask": layout.rel(qc_dir / "mask.png"),
            "geojson": layout.rel(qc_dir / "tissue.geojson"),
        },
    }


def _shrink_to(img: np.ndarray, level0_per_px: float, target_level0_per_px: float) -> tuple[np.ndarray, float]:
    """Resize `img` down to `target_level0_per_px` (never up); returns the image and its exact scale."""
    import cv2

    if target_level0_per_px <= level0_per_px * 1.01:
        return img, level0_per_px
    factor = level0_per_px / target_level0_per_px
    h, w = img.shape[:2]
    new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
    small = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return small, level0_per_px * w / new_w


def _tile_fractions(mask: TissueMask, coords: np.ndarray, geometry: TileGeometry, mask_scale: float) -> np.ndarray:
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    size = geometry.tile_size_level0
    boxes = np.column_stack([coords.astype(np.float64), np.full((len(coords), 2), size)])
    return np.asarray(mask.tissue_fractions(boxes, mask_scale), dtype=np.float32)


def _rings(poly: Any) -> list[np.ndarray]:
    outer = getattr(poly, "outer", None)
    holes = getattr(poly, "holes", [])
    return [outer, *holes] if outer is not None else [np.asarray(poly)]


def _store_attrs(
    slide: Slide,
    geometry: TileGeometry,
    slide_id: str,
    mask: TissueMask,
    tissue: TissueParams,
    tiling: TilingParams,
    status: str,
) -> dict[str, Any]:
    info = slide.info
    return {
        "slide_id": slide_id,
        "status": status,
        "slide_path": str(Path(info.path).resolve()),
        "tile_px": geometry.tile_px,
        "target_mpp": geometry.target_mpp,
        "read_level": geometry.read_level,
        "read_size": geometry.read_size,
        "level_downsample": geometry.level_downsample,
        "tile_size_level0": geometry.tile_size_level0,
        "stride_level0": geometry.stride_level0,
        "overlap": geometry.overlap,
        "upsampled": geometry.upsampled,
        "min_tissue_fraction": tiling.min_tissue_fraction,
        "slide_mpp": geometry.slide_mpp,
        "mpp_source": info.mpp_source,
        "slide_dimensions": list(info.dimensions),
        "read_level_dimensions": list(info.level_dimensions[geometry.read_level]),  # CLAM's level_dim
        "backend": info.backend,
        "vendor": info.vendor,
        "slide_file_size": info.file_size,
        "slide_mtime": info.mtime,
        "colour_correction": info.colour_correction,  # e.g. YCbCr frames under an RGB header, converted
        "tissue_area_mm2": float(mask.area_mm2),
        "tissue_params": tissue.model_dump(),
        "mask_threshold": float(mask.threshold),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "store_id": uuid.uuid4().hex,  # new at every tiling: a feature store made from another table is stale
    }
