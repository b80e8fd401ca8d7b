"""Fluorescence slides (dark background, bright signal) are detected and masked on intensity, not saturation:
tissue that fills the slide is tiled instead of ending as "no tissue"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.layout import STATUS_NO_TISSUE, STATUS_OK
from wsi_pipeline.slide.reader import open_slide
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.modality import detect_modality
from wsi_pipeline.tiling.stage import tile_slide
from wsi_pipeline.tiling.tissue import compute_tissue_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def fluorescence_slide(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = tmp_path_factory.mktemp("fl") / "fl.svs"
    return write_synthetic_slide(path, width=4096, height=3072, mpp=0.5, fmt="svs", stain="fluorescence", seed=7)


def test_fluorescence_is_detected_and_masked_against_the_known_regions(fluorescence_slide) -> None:  # noqa: ANN001
    spec = fluorescence_slide
    with open_slide(spec.path) as slide:
        level = slide.level_count - 2
        ds = slide.info.level_downsamples[level]
        w, h = slide.info.level_dimensions[level]
        img = slide.read_region((0, 0), level, (w, h))
    assert detect_modality(img) == "fluorescence"
    truth = spec.truth_mask(ds)
    fl = compute_tissue_mask(img, spec.mpp * ds, modality="fluorescence")
    assert dice(fl.mask, truth) >= 0.9
    bf = compute_tissue_mask(img, spec.mpp * ds, modality="brightfield")
    assert dice(bf.mask, truth) < 0.5  # what every fluorescence slide got before: tissue missed


def test_fluorescence_slide_is_tiled_and_says_so(fluorescence_slide, tmp_path: Path) -> None:  # noqa: ANN001
    side = tile_slide(fluorescence_slide.path, tmp_path / "results")
    # the same scene stained H&E: the tile count a correct mask gives
    twin = write_synthetic_slide(tmp_path / "bf.svs", width=4096, height=3072, mpp=0.5, fmt="svs", seed=7)
    expected = tile_slide(twin.path, tmp_path / "results").n_tiles
    assert side.status == STATUS_OK and side.modality == "fluorescence" and abs(side.n_tiles - expected) <= 2
    assert side.background_rgb is None and side.warnings == []  # glass colour is a brightfield check

    blank = write_synthetic_slide(
        tmp_path / "dark.svs", width=2048, height=2048, mpp=0.5, stain="fluorescence", regions=()
    )
    dark = tile_slide(blank.path, tmp_path / "results")
    assert dark.status == STATUS_NO_TISSUE  # a dark slide with no signal is not all tissue


def test_brightfield_slides_stay_brightfield(cmu_slide: Path, tmp_path: Path) -> None:
    side = tile_slide(cmu_slide, tmp_path / "results")
    assert side.modality == "brightfield" and side.status == STATUS_OK and side.warnings == []
    assert side.background_rgb is not None and min(side.background_rgb) > 200


def test_strongly_coloured_glass_is_flagged_not_passed_as_ok(tmp_path: Path) -> None:
    """YCbCr values shown as RGB (one of the ways colours are read wrongly): glass reads about (240, 128, 128)."""
    import cv2
    import tifffile

    src = write_synthetic_slide(tmp_path / "src.svs", width=2048, height=2048, mpp=0.5, fmt="svs", seed=4)
    rgb = tifffile.imread(src.path, level=0)
    wrong = np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]])  # Y, Cb, Cr as R, G, B
    tifffile.imwrite(tmp_path / "wrong.tiff", wrong, tile=(256, 256), photometric="rgb", compression="zlib")
    side = tile_slide(tmp_path / "wrong.tiff", tmp_path / "results", mpp=0.5)
    assert side.modality == "brightfield" and side.background_rgb is not None
    assert side.background_rgb[1] < 160 and side.background_rgb[2] < 160  # the measured colour is recorded
    assert len(side.warnings) == 1 and "far from neutral glass" in side.warnings[0]
    good = tile_slide(src.path, tmp_path / "results")
    assert good.warnings == []  # the same slide with its colours right


def test_fluorescence_through_a_brightfield_encoder_is_warned_about_in_the_report(
    fluorescence_slide,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    from wsi_pipeline.encode.engine import encode_slide
    from wsi_pipeline.encoders import EncoderConfig
    from wsi_pipeline.report.report import build_report, failure_summary

    results = tmp_path / "results"
    tile_slide(fluorescence_slide.path, results, slide_id="fl")
    side = encode_slide(results, "fl", EncoderConfig(name="stain-texture"), device="cpu")
    assert side.status == STATUS_OK and any("brightfield" in w for w in side.warnings)
    table = build_report(sorted((results / "tiles").glob("*.json")), results, encoder="stain-texture")
    row = table.set_index("slide_id").loc["fl"]
    assert row["modality"] == "fluorescence" and "brightfield" in row["warnings"]
    assert "CHECK fl:" in failure_summary(table)


def test_glass_chroma_matches_opencv_lab() -> None:
    """The closed-form sRGB -> CIELAB chroma agrees with OpenCV's Lab conversion (float path) to 0.5."""
    import cv2

    from wsi_pipeline.tiling.modality import glass_chroma

    rng = np.random.default_rng(0)
    for colour in [(255, 255, 255), (0, 0, 0), (240, 128, 128), (236, 234, 240), *rng.integers(0, 256, (300, 3))]:
        lab = cv2.cvtColor(np.array([[colour]], np.float32) / 255.0, cv2.COLOR_RGB2LAB)[0, 0]
        expected = float(np.hypot(lab[1], lab[2]))
        assert abs(glass_chroma(tuple(int(v) for v in colour)) - expected) < 0.5, colour
