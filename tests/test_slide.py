"""The slide reader on real slides: metadata, pixels, backends, and every bad input as a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from wsi_pipeline.errors import MissingMPPError, SlideError
from wsi_pipeline.slide.ids import default_slide_id
from wsi_pipeline.slide.reader import open_slide


def test_cmu_metadata_matches_openslide(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as s, openslide.OpenSlide(str(cmu_slide)) as ref:
        assert s.backend == "openslide"
        assert s.info.vendor == "aperio"
        assert s.info.dimensions == ref.dimensions == (2220, 2967)
        assert s.info.level_downsamples == tuple(ref.level_downsamples)
        assert s.info.mpp == pytest.approx(0.499)
        assert s.info.mpp_source == "metadata"
        assert s.info.objective_power == 20
        assert set(s.info.associated_images) == {"label", "macro", "thumbnail"}
        assert s.info.file_size == cmu_slide.stat().st_size


def test_read_region_is_rgb_and_equals_openslide(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as s, openslide.OpenSlide(str(cmu_slide)) as ref:
        tile = s.read_region((600, 900), 0, (256, 200))
        expected = np.asarray(ref.read_region((600, 900), 0, (256, 200)).convert("RGB"))
    assert tile.dtype == np.uint8 and tile.shape == (200, 256, 3)
    np.testing.assert_array_equal(tile, expected)


def test_tiffslide_backend_reads_the_same_pixels(cmu_slide: Path) -> None:
    with open_slide(cmu_slide, backend="openslide") as a, open_slide(cmu_slide, backend="tiffslide") as b:
        assert b.backend == "tiffslide"
        assert b.info.mpp == pytest.approx(a.info.mpp)
        ta, tb = a.read_region((300, 300), 0, (240, 240)), b.read_region((300, 300), 0, (240, 240))
    # Both decode the same JPEG tiles; decoders may differ by a grey level or two.
    assert np.abs(ta.astype(int) - tb.astype(int)).mean() < 2.0


def test_jpeg2000_slide_reads_and_has_no_mpp(tcga_slide: Path) -> None:
    with open_slide(tcga_slide) as s:
        assert s.info.mpp is None and s.info.mpp_source == "missing"
        assert s.level_count == 2
        tile = s.read_region((2000, 1500), 1, (128, 128))
        assert tile.std() > 5  # real tissue, not a blank
        with pytest.raises(MissingMPPError) as err:
            s.require_mpp()
    msg = str(err.value)
    assert "\n" not in msg and str(tcga_slide) in msg and "'mpp' column" in msg


def test_mpp_override_is_used_and_recorded(tcga_slide: Path) -> None:
    with open_slide(tcga_slide, mpp=0.5) as s:
        assert s.require_mpp() == 0.5 and s.info.mpp_source == "override"


def test_thumbnail_at_mpp_scale(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as s:
        img, level0_per_px = s.thumbnail_at_mpp(8.0)
    assert img.shape[2] == 3
    assert level0_per_px == pytest.approx(8.0 / 0.499, rel=0.02)
    assert img.shape[1] == round(2220 / level0_per_px)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d, tmp: d / "slides" / "broken.svs", "not a readable slide"),
        (lambda d, tmp: tmp / "missing.svs", "file not found"),
        (lambda d, tmp: (tmp / "empty.svs").write_bytes(b"") or tmp / "empty.svs", "empty (0 bytes)"),
        (lambda d, tmp: (tmp / "folder").mkdir() or tmp / "folder", "not a DICOM slide"),
    ],
    ids=["not-a-tiff", "missing", "zero-bytes", "plain-directory"],
)
def test_bad_inputs_give_one_line_errors(shared_data: Path, tmp_path: Path, make, expected: str) -> None:
    path = make(shared_data, tmp_path)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg


def test_truncated_slide_is_refused_not_read_as_garbage(truncated_cmu: Path) -> None:
    with pytest.raises(SlideError) as err:
        open_slide(truncated_cmu)
    assert str(truncated_cmu) in str(err.value) and "\n" not in str(err.value)


def test_implausible_override_is_refused(cmu_slide: Path) -> None:
    with pytest.raises(SlideError, match="outside"):
        open_slide(cmu_slide, mpp=500.0)


def test_default_slide_id(tmp_path: Path) -> None:
    assert default_slide_id("/x/TCGA-AB.svs") == "TCGA-AB"
    assert default_slide_id("/x/img.ome.tiff") == "img"
    (tmp_path / "case7").mkdir()
    assert default_slide_id(tmp_path / "case7") == "case7"


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_threaded_read_gives_the_same_pixels_as_one_read(shared_data: Path, name: str) -> None:
    """Large areas are decoded in strips on threads; strips start only where that is pixel-exact."""
    with open_slide(shared_data / "slides" / name, mpp=0.25) as slide:
        w, h = slide.info.level_dimensions[0]
        assert len(slide.exact_strip_cuts(0, h)) > 2  # level 0 of a real SVS is split
        np.testing.assert_array_equal(
            slide.read_region_threaded((0, 0), 0, (w, h)), slide.read_region((0, 0), 0, (w, h))
        )
        level = slide.level_count - 1
        lw, lh = slide.info.level_dimensions[level]
        np.testing.assert_array_equal(
            slide.read_region_threaded((0, 0), level, (lw, lh)), slide.read_region((0, 0), level, (lw, lh))
        )
