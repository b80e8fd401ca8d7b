"""Stage 1 on synthetic slides with known tissue: mask accuracy, exact tile counts, every format, no-tissue."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from wsi_pipeline.report.export import export_h5
from wsi_pipeline.synthetic import Region, write_synthetic_slide
from wsi_pipeline.tiling.config import TilingParams
from wsi_pipeline.tiling.stage import tile_slide

MPP = 0.25
TILE_L0 = 512  # 256 px at 0.5 µm/px on a 0.25 µm/px slide


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _mask_png(results: Path, sid: str) -> np.ndarray:
    return cv2.imread(str(results / "qc" / sid / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0


@pytest.mark.parametrize(
    "fmt, ask, backend",
    [
        ("svs", "auto", "openslide"),
        ("tiff", "auto", "openslide"),
        ("ome", "tiffslide", "tiffslide"),
        ("flat", "auto", "tiffslide"),
    ],
)
def test_every_format_masks_the_known_regions(tmp_path: Path, fmt: str, ask: str, backend: str) -> None:
    # auto falls back to TiffSlide for the flat strip TIFF that OpenSlide refuses; OME-TIFF is read by both.
    spec = write_synthetic_slide(
        tmp_path / f"s.{'tif' if fmt != 'svs' else 'svs'}", width=6144, height=4608, mpp=MPP, fmt=fmt, seed=3
    )
    side = tile_slide(spec.path, tmp_path / "res", slide_id="s", backend=ask)
    assert side["status"] == "ok", side.get("reason")
    assert side["slide"]["backend"] == backend
    mask = _mask_png(tmp_path / "res", "s")
    truth = spec.truth_mask(spec.width / mask.shape[1])[: mask.shape[0], : mask.shape[1]]
    assert _dice(mask, truth) >= 0.95
    # the tissue area agrees with the regions' area
    truth_mm2 = spec.truth_mask(8.0).sum() * (8 * MPP / 1000) ** 2
    assert side["tissue_area_mm2"] == pytest.approx(truth_mm2, rel=0.05)


def test_exact_tile_counts_on_grid_aligned_tissue(tmp_path: Path) -> None:
    # Two rectangles covering whole tiles: 4x3 tiles and 2x2 tiles -> exactly 16 tiles at any threshold <= 0.9.
    regions = (
        Region("rectangle", 2 * TILE_L0, 1 * TILE_L0, 6 * TILE_L0, 4 * TILE_L0),
        Region("rectangle", 8 * TILE_L0, 5 * TILE_L0, 10 * TILE_L0, 7 * TILE_L0),
    )
    spec = write_synthetic_slide(
        tmp_path / "grid.svs", width=12 * TILE_L0, height=8 * TILE_L0, mpp=MPP, regions=regions, seed=1
    )
    for threshold in (0.25, 0.9):
        res = tmp_path / f"res{threshold}"
        side = tile_slide(spec.path, res, tiling=TilingParams(min_tissue_fraction=threshold))
        assert side["n_tiles"] == 16
        coords = zarr.open_group(str(res / "tiles" / "grid.zarr"), mode="r")["coords"][:]
        expected = {(x * TILE_L0, y * TILE_L0) for x in range(2, 6) for y in range(1, 4)}
        expected |= {(x * TILE_L0, y * TILE_L0) for x in range(8, 10) for y in range(5, 7)}
        assert {tuple(c) for c in coords.tolist()} == expected


def test_tile_count_matches_truth_for_curved_tissue(tmp_path: Path) -> None:
    spec = write_synthetic_slide(tmp_path / "e.svs", width=8192, height=6144, mpp=MPP, seed=5)
    side = tile_slide(spec.path, tmp_path / "res")
    g = zarr.open_group(str(tmp_path / "res" / "tiles" / "e.zarr"), mode="r")
    coords, fractions = g["coords"][:], g["tissue_fraction"][:]
    truth = spec.truth_mask(8.0)  # 8 level-0 px per truth pixel -> 64 per tile side
    truth_fraction = np.array(
        [truth[y // 8 : (y + TILE_L0) // 8, x // 8 : (x + TILE_L0) // 8].mean() for x, y in coords]
    )
    assert np.abs(truth_fraction - fractions).mean() < 0.05
    all_tiles = [(x, y) for y in range(0, 6144 - TILE_L0 + 1, TILE_L0) for x in range(0, 8192 - TILE_L0 + 1, TILE_L0)]
    expected = sum(truth[y // 8 : (y + TILE_L0) // 8, x // 8 : (x + TILE_L0) // 8].mean() >= 0.25 for x, y in all_tiles)
    assert abs(side["n_tiles"] - expected) <= max(2, 0.03 * expected)


def test_pen_marks_and_black_border_are_not_tiled(tmp_path: Path) -> None:
    spec = write_synthetic_slide(
        tmp_path / "pen.svs",
        width=8192,
        height=6144,
        mpp=MPP,
        seed=7,
        pen_marks=("blue", "green", "black"),
        black_border=True,
    )
    side = tile_slide(spec.path, tmp_path / "res")
    assert side["status"] == "ok"
    mask = _mask_png(tmp_path / "res", "pen")
    truth = spec.truth_mask(spec.width / mask.shape[1])[: mask.shape[0], : mask.shape[1]]
    assert _dice(mask, truth) >= 0.95
    coords = zarr.open_group(str(tmp_path / "res" / "tiles" / "pen.zarr"), mode="r")["coords"][:]
    for x0, y0, x1, y1 in spec.pen_boxes.values():  # no tile lies mostly on ink
        inside = (
            (coords[:, 0] >= x0)
            & (coords[:, 0] + TILE_L0 <= x1)
            & (coords[:, 1] >= y0)
            & (coords[:, 1] + TILE_L0 <= y1)
        )
        assert not inside.any()


def test_white_slide_is_no_tissue_not_an_error(tmp_path: Path) -> None:
    spec = write_synthetic_slide(tmp_path / "white.svs", width=4096, height=3072, mpp=MPP, regions=())
    side = tile_slide(spec.path, tmp_path / "res")
    assert side["status"] == "no tissue" and side["n_tiles"] == 0
    g = zarr.open_group(str(tmp_path / "res" / "tiles" / "white.zarr"), mode="r")
    assert g["coords"].shape == (0, 2) and g.attrs["status"] == "no tissue"
    assert json.loads((tmp_path / "res" / "tiles" / "white.json").read_text())["status"] == "no tissue"


def test_flat_slide_mask_is_read_in_bands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_pipeline.slide.reader as slide_mod

    monkeypatch.setattr(slide_mod, "BAND_ROWS", 700)  # force several bands on a small flat slide
    spec = write_synthetic_slide(tmp_path / "flat.tif", width=4096, height=3072, mpp=MPP, fmt="flat", seed=2)
    side = tile_slide(spec.path, tmp_path / "res")
    mask = _mask_png(tmp_path / "res", "flat")
    truth = spec.truth_mask(spec.width / mask.shape[1])[: mask.shape[0], : mask.shape[1]]
    assert list(map(list, side["slide"]["level_dimensions"])) == [[4096, 3072]] and _dice(mask, truth) >= 0.95


def test_no_mpp_synthetic_slide_needs_override(tmp_path: Path) -> None:
    spec = write_synthetic_slide(tmp_path / "nompp.svs", width=4096, height=3072, mpp=None, seed=4)
    assert tile_slide(spec.path, tmp_path / "a")["status"] == "failed"
    side = tile_slide(spec.path, tmp_path / "b", mpp=MPP)
    assert side["status"] == "ok" and side["slide"]["mpp_source"] == "override"


def test_retiling_replaces_a_store_and_keeps_it_valid(tmp_path: Path) -> None:
    spec = write_synthetic_slide(tmp_path / "r.svs", width=4096, height=3072, mpp=MPP, seed=6)
    first = tile_slide(spec.path, tmp_path / "res")
    second = tile_slide(spec.path, tmp_path / "res", tiling=TilingParams(tile_px=128, target_mpp=0.5))
    assert second["n_tiles"] > first["n_tiles"]
    assert not list((tmp_path / "res" / "tiles").glob("*.tmp-*"))
    g = zarr.open_group(str(tmp_path / "res" / "tiles" / "r.zarr"), mode="r")
    assert g.attrs["tile_px"] == 128 and g["coords"].shape[0] == second["n_tiles"]


def test_export_h5_has_clam_and_trident_attributes(tmp_path: Path) -> None:
    import h5py

    spec = write_synthetic_slide(tmp_path / "h.svs", width=4096, height=3072, mpp=MPP, seed=8)
    tile_slide(spec.path, tmp_path / "res")
    out = export_h5(tmp_path / "res" / "tiles" / "h.zarr", tmp_path / "h5" / "h.h5")
    coords = zarr.open_group(str(tmp_path / "res" / "tiles" / "h.zarr"), mode="r")["coords"][:]
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
        attrs = dict(f["coords"].attrs)
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == TILE_L0  # CLAM: size at the read level
    assert attrs["patch_size_level0"] == TILE_L0 and attrs["level0_magnification"] == pytest.approx(40)  # TRIDENT
    assert attrs["target_magnification"] == pytest.approx(20)
