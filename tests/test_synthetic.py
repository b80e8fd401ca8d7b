"""Synthetic slides open in real OpenSlide / TiffSlide, and their pixels match the recorded geometry."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import tiffslide

from wsi_pipeline.synthetic import (
    Region,
    SyntheticSpec,
    default_regions,
    write_demo_cohort,
    write_synthetic_slide,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
W, H = 2050, 1530  # not tile multiples: partial edge tiles, ceil-sized levels


def _rgb(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def _otsu_mask(rgb: np.ndarray) -> np.ndarray:
    _, m = cv2.threshold(_saturation(rgb), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return m > 0


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    return {
        fmt: write_synthetic_slide(d / f"s.{fmt}", width=W, height=H, mpp=0.5, fmt=fmt, seed=3)
        for fmt in ("svs", "tiff", "ome", "flat")
    }


def test_svs_is_an_aperio_slide_for_openslide_and_tiffslide(slides):
    spec = slides["svs"]
    s = openslide.OpenSlide(spec.path)
    assert s.properties["openslide.vendor"] == "aperio"
    assert s.dimensions == (W, H)
    assert s.level_count == len(spec.level_downsamples) == 3  # 1, 4, 16: until about two tiles
    assert s.level_dimensions == spec.level_dimensions
    assert s.level_downsamples == pytest.approx(spec.level_downsamples, rel=1e-2)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(s.properties["openslide.objective-power"]) == 20
    assert set(s.associated_images) == {"label", "macro", "thumbnail"}
    assert s.associated_images["macro"].size == (1280, 432)
    # the reader's (non-integer) level downsample gives a truth mask of exactly that level's shape
    assert s.level_downsamples[1] != 4.0
    assert spec.truth_mask(s.level_downsamples[1]).shape == s.level_dimensions[1][::-1]
    t = tiffslide.TiffSlide(spec.path)
    assert t.dimensions == (W, H) and t.level_count == 3
    assert t.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
    # both readers decode the RGB-colour-space JPEG tiles to the same colours
    a = _rgb(s.read_region((0, 0), 1, s.level_dimensions[1])).astype(int)
    b = _rgb(t.read_region((0, 0), 1, t.level_dimensions[1])).astype(int)
    assert np.abs(a - b).mean() < 1.0


@pytest.mark.skipif(not (SHARED / "slides" / "cmu-1-small-region.svs").exists(), reason="shared data missing")
def test_svs_page_layout_mirrors_a_real_aperio_file(slides):
    real = tifffile.TiffFile(SHARED / "slides" / "cmu-1-small-region.svs").pages
    ours = tifffile.TiffFile(slides["svs"].path).pages
    assert ours[0].description.startswith("Aperio Image Library") and "\r\n" in ours[0].description
    assert f"{W}x{H} [0,0 {W}x{H}] (256x256) JPEG/RGB Q=80|AppMag = 20|" in ours[0].description
    assert "|MPP = 0.5000" in ours[0].description
    for page in (real, ours):
        assert page[0].is_tiled and not page[1].is_tiled  # level 0, then the stripped thumbnail
        assert (page[0].compression, page[0].photometric) == (7, 2)  # JPEG tiles, photometric RGB
        assert "label" in page[-2].description and page[-2].subfiletype == 1
        assert "macro" in page[-1].description and page[-1].subfiletype == 9
    assert ours[2].is_tiled and ours[2].shape[:2] == (-(-H // 4), -(-W // 4))


def test_svs_without_mpp_has_no_mpp(tmp_path):
    spec = write_synthetic_slide(tmp_path / "nompp.svs", width=1024, height=768, mpp=None)
    s = openslide.OpenSlide(spec.path)
    assert s.properties["openslide.vendor"] == "aperio"
    assert "openslide.mpp-x" not in s.properties and "aperio.MPP" not in s.properties
    assert tiffslide.TiffSlide(spec.path).properties["tiffslide.mpp-x"] is None
    t = write_synthetic_slide(tmp_path / "nompp.tiff", width=1024, height=768, mpp=None, fmt="tiff")
    assert "openslide.mpp-x" not in openslide.OpenSlide(t.path).properties


def test_generic_tiff_levels_and_mpp_from_resolution_tags(slides):
    spec = slides["tiff"]
    s = openslide.OpenSlide(spec.path)
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.level_dimensions == spec.level_dimensions
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
    assert s.properties["tiff.ResolutionUnit"] == "centimeter"
    assert tiffslide.TiffSlide(spec.path).properties["tiffslide.mpp-y"] == pytest.approx(0.5, rel=1e-4)


def test_ome_pyramid_reads_in_tiffslide(slides):
    spec = slides["ome"]
    t = tiffslide.TiffSlide(spec.path)
    assert t.level_dimensions == spec.level_dimensions
    assert t.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
    page = tifffile.TiffFile(spec.path)
    assert page.is_ome and len(page.series[0].levels) == 3
    assert 'PhysicalSizeX="0.5"' in page.ome_metadata


def test_flat_tiff_is_refused_by_openslide_but_read_by_tiffslide(slides):
    spec = slides["flat"]
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(spec.path)
    page = tifffile.TiffFile(spec.path).pages[0]
    assert not page.is_tiled and len(tifffile.TiffFile(spec.path).pages) == 1
    t = tiffslide.TiffSlide(spec.path)
    assert t.dimensions == (W, H) and t.level_count == 1
    assert t.properties["tiffslide.mpp-x"] == pytest.approx(0.5, rel=1e-4)


def _level_rgb(spec, level: int) -> np.ndarray:
    opener = tiffslide.TiffSlide if spec.fmt in ("ome", "flat") else openslide.OpenSlide
    s = opener(spec.path)
    return _rgb(s.read_region((0, 0), level, s.level_dimensions[level]))


@pytest.mark.parametrize("fmt", ["svs", "tiff", "ome", "flat"])
def test_saturation_otsu_mask_matches_truth(slides, fmt):
    spec = slides[fmt]
    level = len(spec.level_downsamples) - 1
    rgb = _level_rgb(spec, level)
    truth = spec.truth_mask(spec.level_downsamples[level])
    assert truth.shape == rgb.shape[:2]
    assert _dice(_otsu_mask(rgb), truth) > 0.95
    sat = _saturation(rgb)
    assert sat[truth].mean() > 4 * sat[~truth].mean()
    tissue, bg = rgb[truth].mean(0), rgb[~truth].mean(0)
    assert tissue[0] > tissue[1] + 30 and tissue[2] > tissue[1]  # pink-purple: R, B above G
    assert np.abs(bg - (240, 238, 240)).max() < 4


def test_truth_mask_agrees_with_opencv_rasterisation():
    regions = default_regions(W, H, seed=5)
    spec = SyntheticSpec(
        path=Path("x"),
        width=W,
        height=H,
        mpp=0.5,
        fmt="svs",
        regions=regions,
        tile_size=256,
        level_downsamples=(1.0, 8.0),
        seed=5,
    )
    assert spec.level_dimensions == ((W, H), (-(-W // 8), -(-H // 8)))
    ref = np.zeros((H, W), np.uint8)
    for r in regions:
        if r.kind == "rectangle":
            cv2.rectangle(ref, (round(r.x0), round(r.y0)), (round(r.x1) - 1, round(r.y1) - 1), 1, -1)
        else:
            c = ((r.x0 + r.x1) / 2 - 0.5, (r.y0 + r.y1) / 2 - 0.5)
            cv2.ellipse(ref, (c, (r.x1 - r.x0, r.y1 - r.y0), 0.0), 1, -1)
    assert _dice(spec.truth_mask(1.0), ref > 0) > 0.99
    coarse = spec.truth_mask(8.0)
    assert coarse.shape == (-(-H // 8), -(-W // 8))
    assert abs(coarse.mean() - spec.truth_mask(1.0).mean()) < 0.01


def test_same_seed_same_pixels_other_seed_differs(tmp_path):
    kw = {"width": 1024, "height": 768, "mpp": 0.5}
    a = write_synthetic_slide(tmp_path / "a.svs", seed=7, **kw)
    b = write_synthetic_slide(tmp_path / "b.svs", seed=7, **kw)
    c = write_synthetic_slide(tmp_path / "c.svs", seed=8, **kw)
    assert a.regions == b.regions and a.regions != c.regions

    def read(p):
        return openslide.OpenSlide(p).read_region((100, 100), 0, (600, 500)).tobytes()

    assert read(a.path) == read(b.path)
    assert read(a.path) != read(c.path)


def test_blank_slide_has_no_tissue(tmp_path):
    spec = write_synthetic_slide(tmp_path / "blank.svs", width=1024, height=768, mpp=0.5, regions=())
    rgb = _rgb(openslide.OpenSlide(spec.path).read_region((0, 0), 0, (1024, 768)))
    assert not spec.truth_mask(1.0).any()
    assert (_saturation(rgb) > 30).mean() < 1e-4
    assert rgb.min() > 200


def test_pen_marks_and_border_where_recorded(tmp_path):
    spec = write_synthetic_slide(
        tmp_path / "pens.svs", width=4096, height=3072, mpp=0.5, pen_marks=("blue", "green", "black"), black_border=True
    )
    assert set(spec.pen_boxes) == {"blue", "green", "black"}
    s = openslide.OpenSlide(spec.path)
    for color, (x0, y0, x1, y1) in spec.pen_boxes.items():
        assert not any(r.intersects(x0, y0, x1, y1) for r in spec.regions)
        rgb = _rgb(s.read_region((int(x0), int(y0)), 0, (int(x1 - x0), int(y1 - y0)))).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        ink = {"blue": (b > r + 80) & (b > g + 60), "green": (g > r + 60) & (g > b + 40), "black": rgb.max(-1) < 70}[
            color
        ]
        assert ink.mean() > 0.1, color
    assert spec.border_width == round(0.015 * 3072)
    rgb = _level_rgb(spec, 1)
    bw = spec.border_width // 4
    for edge in (rgb[: bw - 1], rgb[-bw + 1 :], rgb[:, : bw - 1], rgb[:, -bw + 1 :]):
        assert edge.max() < 30
    assert rgb[bw + 2 : -bw - 2, bw + 2 : -bw - 2].min(-1).mean() > 150  # inside the frame is not black


def test_explicit_regions_are_rendered_where_given(tmp_path):
    regions = (Region("rectangle", 100, 100, 500, 400), Region("ellipse", 600, 300, 1000, 700))
    spec = write_synthetic_slide(
        tmp_path / "r.tiff", width=1024, height=768, mpp=0.25, fmt="tiff", regions=regions, stain="he_dark"
    )
    assert spec.regions == regions
    rgb = _level_rgb(spec, 0)
    assert _dice(_otsu_mask(rgb), spec.truth_mask(1.0)) > 0.97
    with pytest.raises(ValueError, match="format"):
        write_synthetic_slide(tmp_path / "x.png", fmt="png")
    with pytest.raises(ValueError, match="invalid region"):
        Region("circle", 0, 0, 10, 10)


def test_demo_cohort_sheet_is_consistent(tmp_path):
    sheet = write_demo_cohort(tmp_path / "cohort", n_slides=6, seed=1, width=1024, height=768)
    assert list(sheet.columns) == ["slide_id", "path", "patient_id", "label", "time", "event"]
    assert len(sheet) == 6 and sheet.slide_id.is_unique
    assert all(Path(p).exists() for p in sheet.path)
    assert set(sheet.label) == {0, 1} and set(sheet.event) <= {0, 1}
    assert (sheet.time > 0).all()
    per_patient = sheet.groupby("patient_id")
    assert per_patient.size().between(1, 2).all()
    assert (per_patient[["label", "time", "event"]].nunique() == 1).all().all()
    pd.testing.assert_frame_equal(sheet, pd.read_csv(tmp_path / "cohort" / "samples.csv"))
    # the classes differ visibly: class 1 tissue is darker (more, darker nuclei)
    means = {}
    for label, group in sheet.groupby("label"):
        vals = []
        for p in group.path:
            s = openslide.OpenSlide(p)
            rgb = _rgb(s.read_region((0, 0), 0, s.dimensions))
            vals.append(rgb[_otsu_mask(rgb)].mean())
        means[label] = np.mean(vals)
    assert means[0] - means[1] > 15
