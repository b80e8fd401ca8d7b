"""More formats OpenSlide 4 reads, written from a synthetic slide: a DICOM WSI series (a folder), Philips TIFF and
Hamamatsu NDPI.

Each written slide keeps the source's geometry, so the source pixels and its truth mask are the reference:
metadata (vendor, levels, MPP, objective power, associated images), pixels within JPEG tolerance at every level,
and stage 1 end to end (status ok, slide id, mask Dice vs the truth). The DICOM series is also opened with
wsidicom, a reader independent of OpenSlide's libdicom, so the hand-built datasets are checked against the standard
by a second implementation, and the NDPI file with tifffile's NDPI reader.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from format_fixtures import SourcePixels, synthetic_source, write_dicom_wsi, write_ndpi, write_philips_tiff

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slide.reader import open_slide
from wsi_pipeline.tiling.stage import tile_slide

# Not a multiple of the 256 px tile: edge frames/tiles are padded and must be clipped by the reader;
# the coarsest level (ceil 188 rows) is not an exact 16x downsample either.
WIDTH, HEIGHT, MPP = 4000, 3000, 0.5
JPEG_MEAN_ABS = 3.0  # re-encoding at quality 90: mean |diff| is ~1 grey level; 3 leaves room, a wrong tile is ~40


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourcePixels:
    return synthetic_source(tmp_path_factory.mktemp("src") / "source.svs", width=WIDTH, height=HEIGHT, mpp=MPP)


@pytest.fixture(scope="module")
def slides(source: SourcePixels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    dicom_dir = root / "dicom_slide_01"
    write_dicom_wsi(source, dicom_dir)
    return {"dicom": dicom_dir, "philips": write_philips_tiff(source, root / "philips_slide_01.tiff")}


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| over all pixels and channels; uint8 arithmetic (an int64 copy of a level costs seconds)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(cv2.absdiff(np.ascontiguousarray(a), np.ascontiguousarray(b)).mean())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def _expected_levels(source: SourcePixels, vendor: str) -> tuple[tuple[int, int], ...]:
    # DICOM reports each instance's TotalPixelMatrix size (the ceil-sized level); Philips trims the padding
    # of reduced levels to floor(level-0 size / downsample).
    if vendor == "dicom":
        return source.spec.level_dimensions
    return tuple((WIDTH // int(d), HEIGHT // int(d)) for d in source.spec.level_downsamples)


# -- the written files are what they claim to be -----------------------------------------------------------------


def test_dicom_series_is_one_file_per_level_plus_label_and_overview(
    slides: dict[str, Path], source: SourcePixels
) -> None:
    import pydicom

    files = sorted(slides["dicom"].glob("*.dcm"))
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {ds.SOPClassUID for ds in datasets} == {"1.2.840.10008.5.1.4.1.1.77.1.6"}  # VL WSI storage
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(files)
    volumes = [ds for ds in datasets if ds.ImageType[2] == "VOLUME"]
    assert sorted(ds.ImageType[2] for ds in datasets if ds.ImageType[2] != "VOLUME") == ["LABEL", "OVERVIEW"]
    assert len(volumes) == len(source.levels)
    for ds in volumes:
        assert ds.DimensionOrganizationType == "TILED_FULL"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline
        tiles = -(-ds.TotalPixelMatrixColumns // ds.Columns) * -(-ds.TotalPixelMatrixRows // ds.Rows)
        assert ds.NumberOfFrames == tiles


def test_wsidicom_reads_the_series_like_openslide(slides: dict[str, Path], source: SourcePixels) -> None:
    from wsidicom import WsiDicom

    level0 = next(p for p in sorted(slides["dicom"].glob("*.dcm")) if p.name.startswith("level-0"))
    with WsiDicom.open(slides["dicom"]) as wsi, openslide.OpenSlide(str(level0)) as osr:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == list(source.spec.level_dimensions)
        assert wsi.mpp.width == pytest.approx(MPP) and wsi.mpp.height == pytest.approx(MPP)
        assert osr.properties["openslide.vendor"] == "dicom"
        # a region crossing frame borders: both decoders see the same JPEG frames in the same places
        ours = np.asarray(osr.read_region((700, 500), 0, (600, 400)))[..., :3]
        theirs = np.asarray(wsi.read_region((700, 500), 0, (600, 400)))[..., :3]
        assert _mean_abs(ours, theirs) < 0.5
        assert _mean_abs(ours, source.levels[0][500:900, 700:1300]) < JPEG_MEAN_ABS
        label = np.asarray(wsi.read_label())[..., :3]
        assert label.shape == source.label.shape


def test_philips_tiff_carries_the_dpufsimport_metadata(slides: dict[str, Path]) -> None:
    path = slides["philips"]
    assert openslide.OpenSlide.detect_format(str(path)) == "philips"
    with openslide.OpenSlide(str(path)) as osr:
        props = osr.properties
        assert props["philips.DICOM_PIXEL_SPACING"].replace('"', "").split() == ["0.0005", "0.0005"]
        assert props["philips.PIM_DP_IMAGE_TYPE"] == "WSI"
        assert float(props["openslide.mpp-x"]) == pytest.approx(MPP)
        assert props["openslide.objective-power"] == "20"
        # every pyramid level has its own pixel-data representation; OpenSlide takes downsamples from them
        n = len(osr.level_dimensions)
        assert [
            props[f"philips.PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE[{i}].PIIM_PIXEL_DATA_REPRESENTATION_NUMBER"]
            for i in range(n)
        ] == [str(i) for i in range(n)]


# -- the pipeline's reader and stage 1 ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["dicom", "philips"])
def test_open_slide_reads_metadata_and_pixels(slides: dict[str, Path], source: SourcePixels, fmt: str) -> None:
    with open_slide(slides[fmt]) as slide:
        info = slide.info
        assert (info.backend, info.vendor) == ("openslide", fmt)
        assert info.dimensions == (WIDTH, HEIGHT)
        assert info.level_dimensions == _expected_levels(source, fmt)
        assert info.level_downsamples[:2] == (1.0, 4.0) and info.level_downsamples[2] == pytest.approx(16, rel=0.01)
        assert (info.mpp_x, info.mpp_y, info.mpp_source) == (pytest.approx(MPP), pytest.approx(MPP), "metadata")
        assert info.objective_power == 20
        assert set(info.associated_images) == {"label", "macro"}
        if fmt == "dicom":  # a folder's size is its files' sizes
            assert info.file_size == sum(p.stat().st_size for p in slides[fmt].iterdir())
        # whole levels, edge tiles included, against the source pixels
        for level, (w, h) in enumerate(info.level_dimensions):
            got = slide.read_region((0, 0), level, (w, h))
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            assert _mean_abs(got, source.levels[level][:h, :w]) < JPEG_MEAN_ABS
        # a level-0 region straddling the last column/row of tiles (4000 = 15 * 256 + 160)
        got = slide.read_region((3700, 2800), 0, (300, 200))
        assert _mean_abs(got, source.levels[0][2800:3000, 3700:4000]) < JPEG_MEAN_ABS
        for name, ref in (("label", source.label), ("macro", source.macro)):
            img = slide.associated_image(name)
            assert img.shape == ref.shape
            assert _mean_abs(img, ref) < JPEG_MEAN_ABS


@pytest.mark.parametrize("fmt", ["dicom", "philips"])
def test_tile_slide_end_to_end(slides: dict[str, Path], source: SourcePixels, tmp_path: Path, fmt: str) -> None:
    side = tile_slide(slides[fmt], tmp_path / "res")
    assert side["status"] == "ok", side.get("reason")
    # the slide id is the folder name for DICOM, the file stem otherwise
    assert side["slide_id"] == {"dicom": "dicom_slide_01", "philips": "philips_slide_01"}[fmt]
    assert side["slide"]["vendor"] == fmt and side["slide"]["mpp_source"] == "metadata"
    assert side["n_tiles"] > 0
    mask = cv2.imread(str(tmp_path / "res" / "qc" / side["slide_id"] / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    truth = source.spec.truth_mask(WIDTH / mask.shape[1])[: mask.shape[0], : mask.shape[1]]
    assert truth.any() and _dice(mask, truth) >= 0.95


def test_tile_counts_agree_with_the_source_slide(slides: dict[str, Path], source: SourcePixels, tmp_path: Path) -> None:
    # Same tissue, same MPP: the format must not change which tiles are kept (JPEG noise may flip a border tile).
    counts = {fmt: tile_slide(p, tmp_path / fmt)["n_tiles"] for fmt, p in slides.items()}
    counts["source"] = tile_slide(source.spec.path, tmp_path / "source")["n_tiles"]
    assert max(counts.values()) - min(counts.values()) <= 2, counts


# -- DICOM folders that are not one clean series ----------------------------------------------------------------


def _copy_series(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_dicom_folder_opens_from_any_of_its_files(slides: dict[str, Path], tmp_path: Path) -> None:
    # OpenSlide assembles the series from whichever file it is given; the reader picks the first by name.
    for keep in ("label.dcm", "level-2.dcm"):
        folder = _copy_series(slides["dicom"], tmp_path / keep.replace(".", "_"))
        for p in folder.iterdir():  # rename so that `keep` sorts first
            p.rename(folder / (("0-" if p.name == keep else "1-") + p.name))
        with open_slide(folder) as slide:
            assert slide.info.vendor == "dicom" and slide.info.dimensions == (WIDTH, HEIGHT)
            assert len(slide.info.level_dimensions) == 3


def test_dicom_folder_without_volume_images_is_a_slide_error(slides: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy_series(slides["dicom"], tmp_path / "labels_only")
    for p in folder.glob("level-*.dcm"):
        p.unlink()
    with pytest.raises(SlideError, match="labels_only"):
        open_slide(folder)


def test_dicom_folder_with_a_non_wsi_instance_first(slides: dict[str, Path], tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = _copy_series(slides["dicom"], tmp_path / "with_sr")
    # e.g. an exported report or annotation object beside the slide, sorting before the image files
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientID = "SR", "SYNTH"
    ds.save_as(folder / "0-report.dcm", enforce_file_format=True)
    with open_slide(folder) as slide:
        assert slide.info.vendor == "dicom"


# -- Hamamatsu NDPI -----------------------------------------------------------------------------------------------
# NDPI levels are single restart-marked JPEGs whose sizes must be whole MCUs, so this source is 4096 x 3072.
NDPI_W, NDPI_H = 4096, 3072


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory: pytest.TempPathFactory) -> tuple[SourcePixels, Path]:
    root = tmp_path_factory.mktemp("ndpi")
    src = synthetic_source(root / "source.svs", width=NDPI_W, height=NDPI_H, mpp=MPP, seed=5)
    return src, write_ndpi(src, root / "ndpi_slide_01.ndpi")


def test_ndpi_is_read_by_openslide_and_tifffile(ndpi: tuple[SourcePixels, Path]) -> None:
    import tifffile

    src, path = ndpi
    assert openslide.OpenSlide.detect_format(str(path)) == "hamamatsu"
    with tifffile.TiffFile(path) as tf:  # an independent NDPI reader: 64-bit IFD offsets, restart-marked strips
        assert tf.is_ndpi
        levels = tf.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [img.shape[:2] for img in src.levels]
        assert _mean_abs(levels[0].asarray(), src.levels[0]) < JPEG_MEAN_ABS
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties["hamamatsu.SourceLens"] == "20"
        # restart intervals are the tiles: 16 MCUs of 16 x 8 px
        assert (osr.properties["openslide.level[0].tile-width"], osr.properties["openslide.level[0].tile-height"]) == (
            "256",
            "8",
        )


def test_ndpi_through_open_slide_and_tile_slide(ndpi: tuple[SourcePixels, Path], tmp_path: Path) -> None:
    src, path = ndpi
    with open_slide(path) as slide:
        info = slide.info
        assert (info.backend, info.vendor) == ("openslide", "hamamatsu")
        assert info.dimensions == (NDPI_W, NDPI_H)
        assert (info.mpp, info.mpp_source, info.objective_power) == (pytest.approx(MPP), "metadata", 20)
        assert info.associated_images == ("macro",)
        # OpenSlide adds power-of-two levels decoded with JPEG DCT scaling between the stored ones
        assert info.level_downsamples[:5] == (1.0, 2.0, 4.0, 8.0, 16.0)
        stored = dict(zip(src.spec.level_downsamples, src.levels, strict=True))
        for level, (d, (w, h)) in enumerate(zip(info.level_downsamples, info.level_dimensions, strict=True)):
            base = max(s for s in stored if s <= d)
            ref = cv2.resize(stored[base], (w, h), interpolation=cv2.INTER_AREA) if d != base else stored[base]
            got = slide.read_region((0, 0), level, (w, h))
            assert _mean_abs(got, ref) < (JPEG_MEAN_ABS if d == base else 2 * JPEG_MEAN_ABS), (level, d)
        got = slide.read_region((1000, 2000), 0, (300, 200))
        assert _mean_abs(got, src.levels[0][2000:2200, 1000:1300]) < JPEG_MEAN_ABS
        assert _mean_abs(slide.associated_image("macro"), src.macro) < JPEG_MEAN_ABS
    side = tile_slide(path, tmp_path / "res")
    assert side["status"] == "ok", side.get("reason")
    assert side["slide_id"] == "ndpi_slide_01" and side["slide"]["vendor"] == "hamamatsu"
    mask = cv2.imread(str(tmp_path / "res" / "qc" / "ndpi_slide_01" / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    truth = src.spec.truth_mask(NDPI_W / mask.shape[1])[: mask.shape[0], : mask.shape[1]]
    assert truth.any() and _dice(mask, truth) >= 0.95
    # same tissue as the source SVS: the same tiles (up to JPEG noise at a border tile)
    assert abs(side["n_tiles"] - tile_slide(src.spec.path, tmp_path / "src")["n_tiles"]) <= 2
