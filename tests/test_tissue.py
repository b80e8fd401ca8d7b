"""Tissue mask: synthetic slides with known truth, exact contours, tile fractions, GeoJSON, and the real slides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from skimage.draw import polygon2mask
from skimage.filters import threshold_otsu

from wsi_pipeline.tiling.tissue import (
    TissueMask,
    TissueParams,
    compute_tissue_mask,
    mask_polygons,
    render_overlay,
    saturation_channel,
    write_geojson,
    write_mask_png,
)

MPP = 8.0
PINK, PURPLE = (225, 140, 185), (140, 90, 175)  # eosin-rich stroma, hematoxylin-rich epithelium


def _glass(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = np.full((h, w, 3), (242, 240, 244), dtype=np.float64)
    return img + rng.normal(0, 3, img.shape)


def _paint(
    img: np.ndarray, region: np.ndarray, rgb: tuple[int, int, int], rng: np.random.Generator, noise: float = 10.0
) -> None:
    img[region] = np.asarray(rgb, dtype=np.float64) + rng.normal(0, noise, (int(region.sum()), 3))


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _disk(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """A 3.2 mm square of glass at 8 µm/px with four pink / purple tissue disks; returns (rgb, truth)."""
    rng = np.random.default_rng(0)
    shape = (400, 400)
    img = _glass(*shape, rng)
    truth = np.zeros(shape, bool)
    for i, (cx, cy, r) in enumerate([(100, 100, 60), (290, 110, 45), (110, 290, 50), (280, 290, 70)]):
        disk = _disk(shape, cx, cy, r)
        _paint(img, disk, PINK if i % 2 else PURPLE, rng)
        truth |= disk
    return _u8(img), truth


def test_disks_found_with_high_dice(synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, truth = synthetic
    result = compute_tissue_mask(rgb, MPP, TissueParams())
    assert result.mask.dtype == bool and result.mask.shape == truth.shape
    assert _dice(result.mask, truth) >= 0.95
    assert len(result.contours) == 4
    assert result.area_mm2 == pytest.approx(truth.sum() * (MPP / 1000) ** 2, rel=0.05)


def test_mask_is_not_shifted(synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    # Even-sized morphology kernels have no centre pixel and drift the mask; the centroids must stay put.
    rgb, truth = synthetic
    for close_um, open_um in [(32.0, 16.0), (24.0, 40.0)]:
        mask = compute_tissue_mask(rgb, MPP, TissueParams(close_um=close_um, open_um=open_um)).mask
        shift = np.argwhere(mask).mean(axis=0) - np.argwhere(truth).mean(axis=0)
        assert np.abs(shift).max() < 0.25


def test_otsu_threshold_matches_skimage(synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, _ = synthetic
    params = TissueParams()
    result = compute_tissue_mask(rgb, MPP, params)
    reference = threshold_otsu(saturation_channel(rgb, MPP, params))
    assert reference > params.min_saturation  # the floor is not what decided it
    assert abs(result.threshold - reference) <= 1.0


def test_fixed_threshold_is_used(synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, truth = synthetic
    result = compute_tissue_mask(rgb, MPP, TissueParams(saturation_threshold=200))
    assert result.threshold == 200 and not result.mask.any()  # above every tissue saturation here


def test_all_white_gives_empty_mask(tmp_path: Path) -> None:
    rgb = _u8(_glass(200, 300, np.random.default_rng(1)))
    result = compute_tissue_mask(rgb, MPP, TissueParams())
    assert not result.mask.any() and result.is_empty
    assert result.contours == [] and result.area_mm2 == 0.0
    assert result.threshold >= TissueParams().min_saturation
    assert result.to_geojson(16.0, "blank") == {"type": "FeatureCollection", "features": []}
    assert np.all(result.tissue_fractions(np.array([[0, 0, 100, 100], [50, 50, 8, 8]]), 16.0) == 0)
    write_mask_png(result, tmp_path / "m.png")
    assert not cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED).any()


def _ring_with_holes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tissue disk (r 80 px) with a big hole (r 25 px, 0.126 mm²) and a small one (r 6 px, 0.007 mm²)."""
    shape = (240, 240)
    img = _glass(*shape, rng)
    big_hole, small_hole = _disk(shape, 100, 120, 25), _disk(shape, 165, 120, 6)
    tissue = _disk(shape, 120, 120, 80) & ~big_hole & ~small_hole
    _paint(img, tissue, PINK, rng)
    return _u8(img), big_hole, small_hole


def _core(region: np.ndarray, px: int = 3) -> np.ndarray:
    """`region` shrunk by `px`: blur and closing may move edges by a pixel or two."""
    return cv2.erode(region.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)).astype(bool)


def test_holes_kept_or_filled() -> None:
    rgb, big_hole, small_hole = _ring_with_holes(np.random.default_rng(2))
    kept = compute_tissue_mask(rgb, MPP, TissueParams(min_hole_area_mm2=0.01))
    assert not kept.mask[_core(big_hole)].any()  # 0.126 mm² > 0.01: a real hole
    assert kept.mask[small_hole].all()  # 0.007 mm² < 0.01: filled
    assert len(kept.contours) == 1 and len(kept.contours[0].holes) == 1
    assert kept.contours[0].area_px == kept.mask.sum()

    both = compute_tissue_mask(rgb, MPP, TissueParams(min_hole_area_mm2=0.001))  # keeps the small one too
    assert not both.mask[_core(small_hole, 2)].any() and len(both.contours[0].holes) == 2

    filled = compute_tissue_mask(rgb, MPP, TissueParams(fill_holes=True))
    assert filled.mask[big_hole].all() and filled.contours[0].holes == []


def test_specks_removed_by_area_in_mm2() -> None:
    rng = np.random.default_rng(3)
    shape = (200, 200)
    img = _glass(*shape, rng)
    big, speck = _disk(shape, 70, 70, 40), _disk(shape, 160, 160, 8)
    _paint(img, big | speck, PURPLE, rng)
    rgb = _u8(img)
    plain = {"blur_um": 0, "close_um": 0, "open_um": 0}  # isolate the area rule from morphology
    speck_px = compute_tissue_mask(rgb, MPP, TissueParams(min_tissue_area_mm2=0, **plain)).mask[speck].sum()
    assert speck_px == speck.sum()
    for mpp in (MPP, 2.0):  # the same pixels are 16x less area at 2 µm/px
        speck_mm2 = speck_px * (mpp / 1000) ** 2
        keep = compute_tissue_mask(rgb, mpp, TissueParams(min_tissue_area_mm2=0.9 * speck_mm2, **plain))
        drop = compute_tissue_mask(rgb, mpp, TissueParams(min_tissue_area_mm2=1.1 * speck_mm2, **plain))
        assert keep.mask[speck].all() and not drop.mask[speck].any()
        assert drop.mask[big].all() and len(drop.contours) == 1


def test_pen_strokes_and_black_border_are_not_tissue(synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, truth = synthetic
    img = rgb.copy()
    strokes = {
        "blue": ((30, 60, 170), (20, 200), (380, 215)),
        "green": ((40, 150, 80), (200, 20), (215, 380)),
        "black": ((55, 55, 62), (20, 380), (380, 370)),
    }
    masks = {}
    for name, (colour, p0, p1) in strokes.items():
        m = np.zeros(truth.shape, np.uint8)
        cv2.line(m, p0, p1, 1, thickness=8)  # 64 µm wide, like a marker line at this scale
        masks[name] = m.astype(bool)
        img[masks[name]] = colour
    border = np.zeros(truth.shape, bool)
    border[:6], border[-6:], border[:, :6], border[:, -6:] = True, True, True, True
    img[border] = (8, 8, 8)

    result = compute_tissue_mask(img, MPP, TissueParams())
    for name, m in masks.items():
        assert not result.mask[m].any(), f"{name} ink marked as tissue"
    assert not result.mask[border].any()
    untouched = truth & ~cv2.dilate(
        np.any(list(masks.values()), axis=0).astype(np.uint8), np.ones((15, 15), np.uint8)
    ).astype(bool)
    assert result.mask[untouched].mean() > 0.97  # tissue away from the ink survives

    # The strokes are saturated enough to pass the threshold: without pen removal blue and green become tissue.
    naive = compute_tissue_mask(img, MPP, TissueParams(remove_pen=False))
    assert naive.mask[masks["blue"] & ~truth].mean() > 0.5 and naive.mask[masks["green"] & ~truth].mean() > 0.5


def test_rgba_transparent_is_glass(synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, truth = synthetic
    rgba = np.dstack([rgb, np.full(truth.shape, 255, np.uint8)])
    rgba[:, :200] = 0  # OpenSlide's read_region returns (0, 0, 0, 0) outside the scanned area
    result = compute_tissue_mask(rgba, MPP, TissueParams())
    assert not result.mask[:, :200].any() and _dice(result.mask[:, 200:], truth[:, 200:]) >= 0.95


def _random_mask(rng: np.random.Generator) -> np.ndarray:
    h, w = rng.integers(1, 32, 2)
    return rng.random((h, w)) < rng.uniform(0.2, 0.8)


def _rasterise(polys: list, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside (skimage); polygon vertices are pixel corners, so centres never tie."""
    out = np.zeros(shape, bool)
    for p in polys:
        for ring in [p.outer, *p.holes]:
            out ^= polygon2mask(shape, ring[:, ::-1] - 0.5)
    return out


def test_contours_are_exact_pixel_edges() -> None:
    rng = np.random.default_rng(4)
    for _ in range(120):  # random noise: diagonal touches, one-pixel spikes, nested holes and islands
        m = _random_mask(rng)
        polys = mask_polygons(m)
        assert sum(p.area_px for p in polys) == m.sum()
        assert np.array_equal(_rasterise(polys, m.shape), m)
    assert mask_polygons(np.zeros((5, 5), bool)) == []
    (single,) = mask_polygons(np.eye(1, dtype=bool))
    assert sorted(map(tuple, single.outer.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def _brute_fractions(mask: np.ndarray, boxes: np.ndarray, p: int, q: int) -> np.ndarray:
    """level0_scale = p / q: upsample the mask p times, so one fine cell is 1/q level-0 pixel; boxes are in
    integer level-0 pixels and may stick out of the slide (outside counts as glass)."""
    fine = np.kron(mask.astype(np.float64), np.ones((p, p)))
    pad = 400
    fine = np.pad(fine, pad)
    out = []
    for x0, y0, w, h in (boxes * q).astype(int):
        out.append(fine[y0 + pad : y0 + h + pad, x0 + pad : x0 + w + pad].sum() / (w * h))
    return np.asarray(out)


@pytest.mark.parametrize("p,q", [(4, 1), (5, 2)])
def test_tissue_fractions_match_brute_force(synthetic: tuple[np.ndarray, np.ndarray], p: int, q: int) -> None:
    _, truth = synthetic
    mask = TissueMask(mask=truth[::4, ::4].copy(), mpp=32.0, contours=[], threshold=0.0)  # 100 x 100
    scale = p / q
    rng = np.random.default_rng(p)
    xy = rng.integers(-40, int(100 * scale) + 10, (300, 2))
    wh = rng.integers(1, 90, (300, 2))
    boxes = np.column_stack([xy, wh]).astype(np.float64)
    fast = mask.tissue_fractions(boxes, scale)
    assert fast.shape == (300,)
    np.testing.assert_allclose(fast, _brute_fractions(mask.mask, boxes, p, q), atol=1e-9)
    assert 0 < fast.mean() < 1
    x0, y0, w, h = boxes[7]
    assert mask.tissue_fraction(x0, y0, w, h, scale) == pytest.approx(fast[7], abs=1e-12)


def test_geojson_structure_and_scale(tmp_path: Path) -> None:
    rgb, big_hole, _ = _ring_with_holes(np.random.default_rng(5))
    result = compute_tissue_mask(rgb, MPP, TissueParams(min_hole_area_mm2=0.01))
    scale = 16.0  # a 0.5 µm/px slide read at 8 µm/px
    path = write_geojson(result, tmp_path / "qc" / "tissue.geojson", level0_scale=scale, slide_id="s1")
    gj = json.loads(path.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 1
    feat = gj["features"][0]
    assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
    assert feat["properties"]["objectType"] == "annotation"
    assert feat["properties"]["classification"]["name"] == "Tissue"
    assert len(feat["properties"]["classification"]["color"]) == 3
    outer, *holes = [np.asarray(r, dtype=np.float64) for r in feat["geometry"]["coordinates"]]
    assert len(holes) == 1
    for ring in [outer, *holes]:
        assert np.array_equal(ring[0], ring[-1]) and len(ring) >= 4

    def shoelace(r: np.ndarray) -> float:
        return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))

    assert shoelace(outer) > 0 and shoelace(holes[0]) < 0  # RFC 7946: exterior CCW, holes CW
    area_level0 = shoelace(outer) + shoelace(holes[0])
    assert area_level0 == pytest.approx(result.mask.sum() * scale**2, rel=1e-9)
    assert abs(shoelace(holes[0])) / scale**2 == pytest.approx(big_hole.sum(), rel=0.05)
    # level-0 extent = mask bounding box (pixel edges) times the scale
    ys, xs = np.nonzero(result.mask)
    assert outer[:, 0].min() == xs.min() * scale and outer[:, 0].max() == (xs.max() + 1) * scale
    assert outer[:, 1].min() == ys.min() * scale and outer[:, 1].max() == (ys.max() + 1) * scale


def test_mask_png_round_trip(tmp_path: Path, synthetic: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, _ = synthetic
    result = compute_tissue_mask(rgb, MPP, TissueParams())
    path = write_mask_png(result, tmp_path / "sub" / "mask.png")
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8 and np.array_equal(back > 0, result.mask) and set(np.unique(back)) <= {0, 255}
    overlay = render_overlay(rgb, result)
    assert overlay.shape == rgb.shape and not np.array_equal(overlay, rgb)


def test_params_validated() -> None:
    with pytest.raises(ValidationError):
        TissueParams(min_tissue_area=1.0)  # type: ignore[call-arg]  # extra fields are typos
    with pytest.raises(ValidationError):
        TissueParams(pen_blue_hue=(130, 100))
    with pytest.raises(ValidationError):
        TissueParams(saturation_threshold=300)
    assert TissueParams(saturation_threshold=40).saturation_threshold == 40
    assert TissueParams.model_validate(TissueParams().model_dump()) == TissueParams()


def _read_at(path: Path, slide_mpp: float, target_mpp: float) -> tuple[np.ndarray, float]:
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
        ds = target_mpp / slide_mpp
        img = np.asarray(slide.get_thumbnail((round(w / ds), round(h / ds))).convert("RGB"))
    return img, w / img.shape[1]  # exact level-0 pixels per mask pixel


def test_real_cmu_slide(cmu_slide: Path, tmp_path: Path) -> None:
    img, scale = _read_at(cmu_slide, 0.499, 8.0)
    result = compute_tissue_mask(img, 0.499 * scale, TissueParams())
    # One tissue strip covering about a third of the field (checked by eye on the overlay).
    assert 0.25 < result.mask.mean() < 0.5
    assert 0.4 < result.area_mm2 < 0.8
    main = max(result.contours, key=lambda p: p.area_px)
    assert main.area_px > 0.9 * result.mask.sum()
    assert not result.mask[:15, :40].any()  # top-left corner is glass
    h, w = result.mask.shape
    assert result.mask[int(0.85 * h), int(0.5 * w)]  # lower middle is tissue
    cv2.imwrite(str(tmp_path / "cmu_overlay.png"), cv2.cvtColor(render_overlay(img, result), cv2.COLOR_RGB2BGR))
    gj = result.to_geojson(scale, "cmu")
    xs = np.concatenate([np.asarray(f["geometry"]["coordinates"][0])[:, 0] for f in gj["features"]])
    assert 0 <= xs.min() and xs.max() <= 2220 + scale  # level-0 pixels of the 2220 px wide slide


def test_real_tcga_jpeg2000_slide(tcga_slide: Path) -> None:
    # No MPP in the file; it is a 20x scan, so 0.5 µm/px is assumed for the test.
    img, scale = _read_at(tcga_slide, 0.5, 8.0)
    result = compute_tissue_mask(img, 0.5 * scale, TissueParams())
    assert 0.5 < result.mask.mean() < 0.8  # one large piece over most of the crop
    main = max(result.contours, key=lambda p: p.area_px)
    assert main.area_px > 0.95 * result.mask.sum()
    h, w = result.mask.shape
    assert result.mask[int(0.6 * h), int(0.3 * w)] and not result.mask[:10, :10].any()


def _smaller_removed(remove: Any, mask: np.ndarray, below: int, connectivity: int) -> np.ndarray:
    """scikit-image's removal of components under `below` px (`max_size` from 0.26, the positional threshold before)."""
    try:
        return remove(mask, max_size=below - 1, connectivity=connectivity)
    except TypeError:
        return remove(mask, below, connectivity=connectivity)


@pytest.mark.parametrize("spacing", [12, 70])  # ~400 holes and specks (one pass over the labels), or a few (boxes)
def test_hole_filling_and_speck_removal_match_scikit_image(spacing: int) -> None:
    from skimage.morphology import remove_small_holes, remove_small_objects

    rng = np.random.default_rng(4)
    shape = (400, 400)
    painted = np.zeros(shape, bool)
    painted[20:380, 20:200] = True
    for y in range(30, 370, spacing):
        for x in range(30, 190, spacing):
            painted[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = False  # holes of 4-25 px
        for x in range(220, 380, spacing):
            painted[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = True  # specks of 4-25 px
    img = _glass(*shape, rng)
    _paint(img, painted, PURPLE, rng)
    rgb = _u8(img)
    plain = {"blur_um": 0, "close_um": 0, "open_um": 0, "fill_holes": False}
    raw = compute_tissue_mask(rgb, MPP, TissueParams(min_tissue_area_mm2=0, min_hole_area_mm2=0, **plain)).mask
    assert (raw != painted).mean() < 0.001  # the reference below starts from what was found, rules off
    px_mm2 = (MPP / 1000) ** 2
    rules = TissueParams(min_tissue_area_mm2=10.5 * px_mm2, min_hole_area_mm2=10.5 * px_mm2, **plain)
    got = compute_tissue_mask(rgb, MPP, rules).mask
    expected = _smaller_removed(remove_small_objects, _smaller_removed(remove_small_holes, raw, 11, 1), 11, 2)
    assert (got == expected).all()
    assert got.sum() != raw.sum()  # some holes were filled and some specks dropped
