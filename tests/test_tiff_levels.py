"""Whole levels decoded straight from TIFF tiles (slide/tiff_levels.py) give OpenSlide's pixels, or are not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_pipeline.errors import SlideError
from wsi_pipeline.layout import STATUS_FAILED
from wsi_pipeline.slide.reader import Slide, open_slide
from wsi_pipeline.slide.tiff_levels import TiffLevels
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.stage import tile_slide


def _both_ways(slide: Slide, level: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, bool]:
    """The level read through the direct decoder (where it applies) and through OpenSlide alone."""
    slide._direct = None  # noqa: SLF001 - the test switches the shortcut on and off on one open slide
    direct = slide.read_level_scaled(level, scale)
    used = bool(slide._direct and slide._direct.has_level(level))  # noqa: SLF001
    slide._direct = False  # noqa: SLF001
    return direct, slide.read_level_scaled(level, scale), used


@pytest.mark.parametrize(
    ("fmt", "compression", "suffix", "tile"),
    [
        ("svs", "jpeg", ".svs", 240),  # Aperio: RGB JPEG tiles with shared JPEG tables, 240 px as Aperio writes
        ("tiff", "jpeg", ".tif", 256),  # generic TIFF: YCbCr JPEG
        ("tiff", "zlib", ".tif", 256),
        ("tiff", "lzw", ".tif", 256),
        ("tiff", "none", ".tif", 256),
    ],
)
def test_every_level_equals_openslide(tmp_path: Path, fmt: str, compression: str, suffix: str, tile: int) -> None:
    """Width and height off the tile grid, so edge tiles are cropped; scale 1 and a shrink both match exactly."""
    path = tmp_path / f"s{suffix}"
    write_synthetic_slide(path, width=3000, height=2100, fmt=fmt, compression=compression, tile_size=tile)
    with open_slide(path) as slide:
        assert slide.level_count >= 2
        for level in range(slide.level_count):
            for scale in (1.0, 0.37):
                direct, reference, used = _both_ways(slide, level, scale)
                assert used, (fmt, compression, level)
                np.testing.assert_array_equal(direct, reference)


def test_real_aperio_slide_equals_openslide(cmu_slide: Path) -> None:
    with open_slide(cmu_slide) as slide:
        direct, reference, used = _both_ways(slide, 0, 0.25)
        assert used and direct.shape == reference.shape
        np.testing.assert_array_equal(direct, reference)


def test_jpeg2000_levels_are_left_to_openslide(tcga_slide: Path) -> None:
    """Aperio JPEG 2000 (33005) is not decoded here: the read goes through OpenSlide and still works."""
    with open_slide(tcga_slide, mpp=0.5) as slide:
        levels = TiffLevels.open(tcga_slide, slide.info.vendor, slide.info.level_dimensions, 2)
        assert levels is None
        direct, reference, used = _both_ways(slide, slide.level_count - 1)
        assert not used
        np.testing.assert_array_equal(direct, reference)


def test_other_vendors_and_ome_subifds_are_not_claimed(tmp_path: Path) -> None:
    path = tmp_path / "s.svs"
    write_synthetic_slide(path, width=1024, height=768)
    with open_slide(path) as slide:
        assert TiffLevels.open(path, "hamamatsu", slide.info.level_dimensions, 2) is None
        assert TiffLevels.open(path, None, slide.info.level_dimensions, 2) is None


def _patch_tile(path: Path, tile: int, *, byte_count: int | None = None, garbage: bool = False) -> None:
    """Set tile `tile` of the first page missing (byte count 0) or overwrite its bytes with garbage."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        counts = page.tags["TileByteCounts"]
        width = {3: 2, 4: 4, 16: 8}[int(counts.dtype)]
        count_at = counts.valueoffset + tile * width
        data_at, data_len = int(page.dataoffsets[tile]), int(page.databytecounts[tile])
    with open(path, "r+b") as f:
        if byte_count is not None:
            f.seek(count_at)
            f.write(int(byte_count).to_bytes(width, "little"))
        if garbage:
            f.seek(data_at)
            f.write(bytes(range(256)) * (data_len // 256) + b"\x00" * (data_len % 256))


def test_missing_tile_is_white_like_openslide(tmp_path: Path) -> None:
    path = tmp_path / "sparse.tif"
    write_synthetic_slide(path, width=1024, height=768, fmt="tiff", compression="zlib", tile_size=256)
    _patch_tile(path, 5, byte_count=0)  # row 1, column 1
    with open_slide(path) as slide:
        direct, reference, used = _both_ways(slide, 0)
    assert used
    np.testing.assert_array_equal(direct, reference)
    assert (direct[256:512, 256:512] == 255).all() and not (direct[:256, :256] == 255).all()


def test_corrupt_tile_is_one_line_error_and_a_failed_slide(tmp_path: Path) -> None:
    """A tile the direct decoder cannot read sends the level to OpenSlide, which fails it with the file named:
    never a blank or a partly read level."""
    path = tmp_path / "corrupt.tif"
    write_synthetic_slide(path, width=2048, height=1536, fmt="tiff", compression="zlib", tile_size=256)
    _patch_tile(path, 0, garbage=True)
    with open_slide(path) as slide, pytest.raises(SlideError) as err:
        slide._direct = None  # noqa: SLF001
        slide.read_level_scaled(0, 0.1)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(slide._direct, TiffLevels) or slide._direct.has_level(0)  # noqa: SLF001 - it was tried
    side = tile_slide(path, tmp_path / "results", mpp=2.0)  # at 2 um/px the mask and QC read level 0
    assert side.status == STATUS_FAILED and str(path) in side.reason


def test_a_refused_level_is_read_by_openslide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the direct decoder trips on, the level still comes back, with OpenSlide's pixels."""
    path = tmp_path / "s.svs"
    write_synthetic_slide(path, width=2000, height=1500)

    def refuse(self: TiffLevels, level: int, band_rows: int) -> None:
        raise ValueError("a tile the decoder does not expect")

    with open_slide(path) as slide:
        reference = slide.read_level_scaled(1, 0.5)
        monkeypatch.setattr(TiffLevels, "bands", refuse)
        slide._direct = None  # noqa: SLF001
        np.testing.assert_array_equal(slide.read_level_scaled(1, 0.5), reference)
        assert slide._direct and slide._direct.has_level(1)  # noqa: SLF001 - the direct path was tried first


@pytest.mark.parametrize("band_rows", [100, 240, 241, 1000, 5000])  # under, at, off and over the 240-px tile rows
def test_bands_of_any_height_tile_the_level_exactly(tmp_path: Path, band_rows: int) -> None:
    """Bands are filled straight from the tiles; rows of a tile that straddles bands land in both, in order."""
    path = tmp_path / "s.svs"
    write_synthetic_slide(path, width=1000, height=1500, tile_size=240)
    with open_slide(path) as slide:
        levels = TiffLevels.open(path, slide.info.vendor, slide.info.level_dimensions, 2)
        assert levels is not None
        bands = list(levels.bands(0, band_rows))
        levels.close()
        assert [len(b) for b in bands[:-1]] == [band_rows] * (len(bands) - 1) and 0 < len(bands[-1]) <= band_rows
        np.testing.assert_array_equal(np.concatenate(bands), slide.read_region((0, 0), 0, (1000, 1500)))


def test_banded_shrink_matches_openslide_across_bands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A level taller than a band (here bands of 300 rows) shrinks to the same pixels on both paths."""
    from wsi_pipeline.slide import reader

    monkeypatch.setattr(reader, "BAND_ROWS", 300)
    path = tmp_path / "s.tif"
    write_synthetic_slide(path, width=900, height=1300, fmt="tiff", compression="jpeg", tile_size=256)
    with open_slide(path) as slide:
        direct, reference, used = _both_ways(slide, 0, 0.3)
    assert used
    np.testing.assert_array_equal(direct, reference)


def test_ycbcr_jpeg_filed_as_rgb_reads_as_openslide_reads_it(tmp_path: Path) -> None:
    """JFIF (YCbCr) JPEG tiles under an RGB photometric tag: OpenSlide shows Y, Cb, Cr as R, G, B, and so does
    the direct decoder (not tifffile's marker-based guess), so the mask and QC picture show what stage 2 will
    encode and the glass-colour check flags the slide instead of passing it with correct-looking QC."""
    import imagecodecs

    src = write_synthetic_slide(tmp_path / "src.svs", width=1024, height=1024, mpp=0.5, seed=4)
    img = tifffile.imread(src.path, level=0)
    tiles = (
        imagecodecs.jpeg_encode(img[y : y + 256, x : x + 256], level=90, outcolorspace="YCBCR", subsampling=(2, 2))
        for y in range(0, 1024, 256)
        for x in range(0, 1024, 256)
    )
    path = tmp_path / "mislabelled.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            tiles,
            shape=(1024, 1024, 3),
            dtype=np.uint8,
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"outcolorspace": "RGB"},
            subsampling=(2, 2),
        )
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].photometric == 2 and tif.pages[0].is_jfif
    with open_slide(path, mpp=0.5) as slide:
        direct, reference, used = _both_ways(slide, 0)
    assert used
    np.testing.assert_array_equal(direct, reference)
    assert abs(int(direct[5, 5, 1]) - 128) < 8  # glass in the corner comes back as (Y, Cb, Cr) ~ (237, 128, 128)
    side = tile_slide(path, tmp_path / "results", mpp=0.5)
    assert any("far from neutral glass" in w for w in side.warnings), side.warnings
