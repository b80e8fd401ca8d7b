"""DICOM WSI whose JPEG frames hold YCbCr while the header says PhotometricInterpretation RGB (a converter's mistake).

OpenSlide trusts the header and returns Y, Cb, Cr as R, G, B: glass reads ~(239, 129, 129) instead of the source's
(240, 238, 240), tissue turns cyan, and the mask and features are wrong with status ok. The reader must spot the
mismatch from the first JPEG frame's markers, convert every read back to RGB and record that it did; a correctly
written series, and one whose frames really are RGB, must be read exactly as before.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import openslide
import pytest
from format_fixtures import SourcePixels, synthetic_source, write_dicom_wsi, write_mislabelled_rgb_dicom_wsi

from wsi_pipeline.slide import dicom
from wsi_pipeline.slide.dicom import jpeg_colour, read_instance
from wsi_pipeline.slide.reader import open_slide
from wsi_pipeline.tiling.stage import tile_slide

WIDTH, HEIGHT, MPP = 4000, 3000, 0.5
JPEG_MEAN_ABS = 3.0  # as in test_formats: re-encoding at quality 90 moves pixels ~1 grey level on average
GLASS = np.array([240, 238, 240])  # the synthetic source's background


def _rgb_jpeg(img: np.ndarray) -> bytes:
    """A JPEG that really holds RGB (libjpeg marks it with an Adobe APP14 transform 0 and ids 'R', 'G', 'B')."""
    return imagecodecs.jpeg8_encode(img, level=90, colorspace="RGB", outcolorspace="RGB")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourcePixels:
    return synthetic_source(tmp_path_factory.mktemp("src") / "source.svs", width=WIDTH, height=HEIGHT, mpp=MPP)


@pytest.fixture(scope="module")
def series(source: SourcePixels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dicom_colour")
    paths = {name: root / f"dicom_{name}" for name in ("right", "mislabelled", "true_rgb")}
    write_dicom_wsi(source, paths["right"])
    write_mislabelled_rgb_dicom_wsi(source, paths["mislabelled"])
    write_dicom_wsi(source, paths["true_rgb"], photometric="RGB", encode=_rgb_jpeg)
    return paths


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(cv2.absdiff(np.ascontiguousarray(a), np.ascontiguousarray(b)).mean())


def _corner(img: np.ndarray) -> np.ndarray:
    """Mean colour of the top-left 64 x 64 px: glass in the synthetic slide."""
    return img[:64, :64].reshape(-1, 3).mean(axis=0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


# -- the fixture is the bug --------------------------------------------------------------------------------------


def test_fixture_reproduces_ycbcr_read_as_rgb(series: dict[str, Path], source: SourcePixels) -> None:
    import pydicom
    from pydicom.encaps import generate_frames
    from wsidicom import WsiDicom

    ds = pydicom.dcmread(series["mislabelled"] / "level-0.dcm")
    assert ds.PhotometricInterpretation == "RGB"
    frame = next(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    assert frame[:2] == b"\xff\xd8" and frame[6:11] == b"JFIF\0"  # a JFIF stream: YCbCr by definition
    with openslide.OpenSlide(str(series["mislabelled"] / "level-0.dcm")) as osr:
        raw = np.asarray(osr.read_region((0, 0), 0, (WIDTH, HEIGHT)))[..., :3]
    # glass comes back as (Y, Cb, Cr) ~ (239, 129, 129): neutral chroma sits at 128
    y, cb, cr = _corner(raw)
    assert abs(y - 239) < 3 and abs(cb - 128) < 3 and abs(cr - 128) < 3, (y, cb, cr)
    assert _mean_abs(raw, source.levels[0]) > 30
    with WsiDicom.open(series["mislabelled"]) as wsi:  # a second reader makes the same mistake
        theirs = np.asarray(wsi.read_region((0, 0), 0, (256, 256)))[..., :3]
    assert abs(_corner(theirs)[1] - 128) < 3


# -- detection ---------------------------------------------------------------------------------------------------


def _drop_segment(data: bytes, marker: int) -> bytes:
    """`data` without its first marker segment `marker` (e.g. 0xE0 for APP0)."""
    i = data.index(bytes([0xFF, marker]))
    return data[:i] + data[i + 2 + int.from_bytes(data[i + 2 : i + 4], "big") :]


def _set_component_ids(data: bytes, ids: tuple[int, int, int]) -> bytes:
    out = bytearray(data)
    sof = out.index(b"\xff\xc0")
    for k, cid in enumerate(ids):
        out[sof + 10 + 3 * k] = cid  # marker(2) length(2) precision(1) height(2) width(2) count(1), then 3 per comp.
    return bytes(out)


def _streams() -> dict[str, bytes]:
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    jfif = imagecodecs.jpeg8_encode(img, level=90)
    adobe_rgb = _rgb_jpeg(img)
    adobe_ycc = bytearray(adobe_rgb)
    adobe_ycc[adobe_ycc.index(b"Adobe") + 11] = 1
    return {
        "jfif": jfif,
        "adobe0": adobe_rgb,
        "adobe1": bytes(adobe_ycc),
        "ids123": _drop_segment(jfif, 0xE0),
        "idsRGB": _drop_segment(adobe_rgb, 0xEE),
        "ids012": _set_component_ids(_drop_segment(jfif, 0xE0), (0, 1, 2)),
    }


@pytest.mark.parametrize(
    ("stream", "model", "evidence"),
    [
        ("jfif", "YCbCr", "JFIF APP0 marker"),
        ("adobe0", "RGB", "Adobe APP14 transform 0"),
        ("adobe1", "YCbCr", "Adobe APP14 transform 1"),
        ("ids123", "YCbCr", "component ids 1, 2, 3"),
        ("idsRGB", "RGB", "component ids R, G, B"),
        ("ids012", None, "component ids (0, 1, 2) and no JFIF or Adobe marker"),
    ],
)
def test_jpeg_colour_follows_libjpeg_rules(stream: str, model: str | None, evidence: str) -> None:
    colour = jpeg_colour(_streams()[stream])
    assert (colour.model, colour.evidence) == (model, evidence)


def test_instances_are_judged_from_the_first_few_hundred_kb(series: dict[str, Path], tmp_path: Path) -> None:
    level0 = series["mislabelled"] / "level-0.dcm"
    whole = read_instance(level0)
    assert whole is not None and whole.mislabelled
    assert (whole.photometric, whole.size, whole.image_type[2]) == ("RGB", (WIDTH, HEIGHT), "VOLUME")
    assert whole.colour is not None and (whole.colour.evidence, whole.colour.sampling) == ("JFIF APP0 marker", "4:2:0")
    head = tmp_path / "head.dcm"
    head.write_bytes(level0.read_bytes()[: 256 * 1024])  # header, offset table and the first frames only
    assert read_instance(head) == replace(whole, path=head)
    right = read_instance(series["right"] / "level-0.dcm")
    true_rgb = read_instance(series["true_rgb"] / "level-0.dcm")
    assert right is not None and right.photometric == "YBR_FULL_422" and not right.mislabelled
    assert true_rgb is not None and true_rgb.colour is not None and true_rgb.colour.model == "RGB"
    assert not true_rgb.mislabelled


# -- correction --------------------------------------------------------------------------------------------------


def test_mislabelled_dicom_reads_the_source_colours(series: dict[str, Path], source: SourcePixels) -> None:
    with open_slide(series["mislabelled"]) as slide, open_slide(series["right"]) as right:
        note = slide.info.colour_correction
        assert note is not None and note.startswith("ycbcr-to-rgb: JFIF APP0 marker (4:2:0 YCbCr)"), note
        assert "PhotometricInterpretation RGB" in note and "levels 0, 1, 2" in note and "label, macro" in note
        assert slide.info.to_dict()["colour_correction"] == note  # what the sidecar's `slide` records
        for level, (w, h) in enumerate(slide.info.level_dimensions):
            got = slide.read_region((0, 0), level, (w, h))
            assert _mean_abs(got, source.levels[level][:h, :w]) < JPEG_MEAN_ABS, level
            # 4:2:0 against the right series' 4:2:2: the same picture up to chroma detail
            assert _mean_abs(got, right.read_region((0, 0), level, (w, h))) < 1.5, level
        assert np.abs(_corner(slide.read_region((0, 0), 0, (256, 256))) - GLASS).max() < 3
        # a region past the last column/row of frames: the transparent outside still composites to white
        edge = slide.read_region((3900, 2900), 0, (200, 200))
        assert (edge[100:, :] == 255).all() and (edge[:, 100:] == 255).all()
        assert _mean_abs(edge[:100, :100], source.levels[0][2900:, 3900:]) < JPEG_MEAN_ABS
        thumb, _ = slide.thumbnail_at_mpp(8.0)  # banded, threaded reads of a lower level
        assert _mean_abs(thumb, right.thumbnail_at_mpp(8.0)[0]) < 1.5
        for name, ref in (("label", source.label), ("macro", source.macro)):
            assert _mean_abs(slide.associated_image(name), ref) < JPEG_MEAN_ABS, name


def test_right_dicom_is_read_as_before(series: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(path: Path) -> None:
        raise AssertionError(f"{path} read although the header is not RGB")

    monkeypatch.setattr(dicom, "read_instance", no_scan)  # a YBR header costs no file reads
    with open_slide(series["right"]) as slide, openslide.OpenSlide(str(series["right"] / "level-0.dcm")) as osr:
        assert slide.info.colour_correction is None and slide.info.to_dict()["colour_correction"] is None
        for level, loc, size in ((0, (700, 500), (600, 400)), (1, (0, 0), (1000, 750)), (2, (0, 0), (250, 188))):
            raw = np.asarray(osr.read_region(loc, level, size))[..., :3]
            assert np.array_equal(slide.read_region(loc, level, size), raw), level
        assert np.array_equal(
            slide.associated_image("label"), np.asarray(osr.associated_images["label"].convert("RGB"))
        )


def test_rgb_frames_under_an_rgb_header_are_not_recoloured(series: dict[str, Path], source: SourcePixels) -> None:
    with open_slide(series["true_rgb"]) as slide:
        assert slide.info.colour_correction is None
        got = slide.read_region((0, 0), 0, (WIDTH, HEIGHT))
        assert _mean_abs(got, source.levels[0]) < JPEG_MEAN_ABS
        assert _mean_abs(slide.associated_image("label"), source.label) < JPEG_MEAN_ABS


# -- stage 1 -----------------------------------------------------------------------------------------------------


def test_tile_slide_keeps_the_source_tiles_and_records_the_correction(
    series: dict[str, Path], source: SourcePixels, tmp_path: Path
) -> None:
    sides = {name: tile_slide(series[name], tmp_path / name) for name in ("mislabelled", "right")}
    sides["source"] = tile_slide(source.spec.path, tmp_path / "source")
    counts = {name: side["n_tiles"] for name, side in sides.items()}
    assert all(side["status"] == "ok" for side in sides.values()), sides
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    mislabelled = sides["mislabelled"]
    assert mislabelled["slide"]["colour_correction"].startswith("ycbcr-to-rgb: JFIF APP0 marker")
    assert sides["right"]["slide"]["colour_correction"] is None
    assert np.abs(np.array(mislabelled["background_rgb"]) - GLASS).max() < 4, mislabelled["background_rgb"]
    qc = tmp_path / "mislabelled" / "qc" / mislabelled["slide_id"]
    mask = cv2.imread(str(qc / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    truth = source.spec.truth_mask(WIDTH / mask.shape[1])[: mask.shape[0], : mask.shape[1]]
    assert truth.any() and _dice(mask, truth) >= 0.95
