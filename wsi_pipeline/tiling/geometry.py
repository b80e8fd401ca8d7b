"""Tile geometry in microns and the tissue-filtered tile grid of a slide.

A tile is `tile_px` pixels at `target_mpp` µm/px. It is read from the coarsest pyramid level that is still at least
as fine as the target (one resize, always a shrink unless the slide itself is coarser than the target) and laid on a
level-0 grid with optional overlap. Tiles covering less than `min_tissue_fraction` tissue are dropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from ..errors import PipelineError
from ..slide.reader import Slide
from .config import TilingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileGeometry:
    """How tiles of one slide are read: everything needed to reproduce a tile from its level-0 coordinates."""

    tile_px: int
    target_mpp: float
    slide_mpp: float
    overlap: float
    read_level: int
    level_downsample: float
    read_size: int  # tile side in pixels of `read_level`, resized once to `tile_px`
    tile_size_level0: float  # tile side in level-0 pixels (exact, not rounded)
    stride_level0: float
    upsampled: bool  # the slide is coarser than the target: tiles are enlarged (recorded, warned)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def plan_geometry(slide: Slide, params: TilingParams) -> TileGeometry:
    slide_mpp = slide.require_mpp()
    downsample = params.target_mpp / slide_mpp  # level-0 pixels per output pixel
    level = slide.best_level_for_downsample(downsample)
    level_ds = slide.info.level_downsamples[level]
    tile_size_level0 = params.tile_px * downsample
    read_size = max(1, round(tile_size_level0 / level_ds))
    upsampled = downsample < 1 - 1e-3
    if upsampled:
        log.warning(
            "%s: slide MPP %.3f is coarser than target %.3f; tiles will be enlarged",
            slide.path,
            slide_mpp,
            params.target_mpp,
        )
    return TileGeometry(
        tile_px=params.tile_px,
        target_mpp=params.target_mpp,
        slide_mpp=slide_mpp,
        overlap=params.overlap,
        read_level=level,
        level_downsample=level_ds,
        read_size=read_size,
        tile_size_level0=tile_size_level0,
        stride_level0=tile_size_level0 * (1.0 - params.overlap),
        upsampled=upsampled,
    )


def grid_coords(width: int, height: int, geometry: TileGeometry) -> np.ndarray:
    """Level-0 top-left (x, y) of every tile lying wholly inside a `width` x `height` slide, row-major."""
    size, stride = geometry.tile_size_level0, geometry.stride_level0
    nx = _count(width, size, stride)
    ny = _count(height, size, stride)
    xs = np.floor(np.arange(nx) * stride + 1e-6).astype(np.int64)
    ys = np.floor(np.arange(ny) * stride + 1e-6).astype(np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def _count(extent: int, size: float, stride: float) -> int:
    if extent < size:
        return 0
    return int(math.floor((extent - size) / stride + 1e-9)) + 1


def read_tile(slide: Slide, xy: tuple[int, int], geometry: TileGeometry) -> np.ndarray:
    """One tile as RGB uint8 (tile_px, tile_px, 3): one read at the planned level, one resize."""
    size = geometry.read_size
    region = slide.read_region((int(xy[0]), int(xy[1])), geometry.read_level, (size, size))
    if size == geometry.tile_px:
        return region
    # INTER_AREA averages when shrinking (no aliasing); cubic when a coarse slide must be enlarged.
    interp = cv2.INTER_AREA if size > geometry.tile_px else cv2.INTER_CUBIC
    return cv2.resize(region, (geometry.tile_px, geometry.tile_px), interpolation=interp)


def geometry_from_attrs(attrs: dict[str, Any]) -> TileGeometry:
    """The `TileGeometry` stage 1 planned, rebuilt from its tile store's attributes."""
    try:
        return TileGeometry(
            tile_px=int(attrs["tile_px"]),
            target_mpp=float(attrs["target_mpp"]),
            slide_mpp=float(attrs["slide_mpp"]),
            overlap=float(attrs.get("overlap", 0.0)),
            read_level=int(attrs["read_level"]),
            level_downsample=float(attrs["level_downsample"]),
            read_size=int(attrs["read_size"]),
            tile_size_level0=float(attrs["tile_size_level0"]),
            stride_level0=float(attrs.get("stride_level0", attrs["tile_size_level0"])),
            upsampled=bool(attrs.get("upsampled", False)),
        )
    except KeyError as err:
        raise PipelineError(
            f"tile store of {attrs.get('slide_id', '?')}: attribute {err} missing; rerun "
            "`wsi-pipeline tile` for this slide (the store predates this version)"
        ) from None
