"""Tile geometry in microns: level choice, read size, grid counts, overlap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.slide.reader import open_slide
from wsi_pipeline.tiling.config import TilingParams
from wsi_pipeline.tiling.geometry import grid_coords, plan_geometry


def test_geometry_on_cmu_at_20x(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as s:
        g = plan_geometry(s, TilingParams(tile_px=256, target_mpp=0.5))
    assert g.read_level == 0
    assert g.tile_size_level0 == pytest.approx(256 * 0.5 / 0.499)
    assert g.read_size == 257  # 256.5 level-0 px, read once and resized to 256
    assert not g.upsampled


def test_geometry_prefers_the_coarsest_level_that_is_fine_enough(tcga_slide: Path) -> None:
    # TCGA crop: levels 1.0 and ~2.0; at mpp 0.25 override, a 1.0 µm/px target is a 4x downsample -> level 1.
    with open_slide(tcga_slide, mpp=0.25) as s:
        g = plan_geometry(s, TilingParams(tile_px=224, target_mpp=1.0))
        assert g.read_level == 1
        assert g.read_size == round(224 * 4 / s.info.level_downsamples[1])
        tile = s.read_region((0, 0), g.read_level, (g.read_size, g.read_size))
    assert tile.shape == (g.read_size, g.read_size, 3)


def test_upsampling_is_flagged(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as s:
        g = plan_geometry(s, TilingParams(tile_px=256, target_mpp=0.25))
    assert g.upsampled and g.read_level == 0 and g.read_size == 128


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_grid_counts_and_bounds(cmu_slide: Path, overlap: float) -> None:
    with open_slide(cmu_slide) as s:
        g = plan_geometry(s, TilingParams(tile_px=256, target_mpp=0.5, overlap=overlap))
        w, h = s.info.dimensions
    coords = grid_coords(w, h, g)
    size, stride = g.tile_size_level0, g.tile_size_level0 * (1 - overlap)
    nx = math.floor((w - size) / stride) + 1
    ny = math.floor((h - size) / stride) + 1
    assert len(coords) == nx * ny
    assert coords.dtype == np.int64
    assert (coords[:, 0] + size <= w + 1e-6).all() and (coords[:, 1] + size <= h + 1e-6).all()
    # row-major, unique
    assert len(np.unique(coords, axis=0)) == len(coords)
    assert (np.diff(coords[:nx, 0]) > 0).all()


def test_slide_smaller_than_a_tile_has_no_tiles(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as s:
        g = plan_geometry(s, TilingParams(tile_px=4096, target_mpp=0.5))
    assert len(grid_coords(2220, 2967, g)) == 0
