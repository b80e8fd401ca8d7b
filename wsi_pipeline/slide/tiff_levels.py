"""Whole pyramid levels decoded straight from a TIFF's tiles (tifffile + imagecodecs), for the mask and QC read.

Reading a whole level through OpenSlide costs several passes over the pixels besides the JPEG decode (ARGB
composition, PIL conversion, RGBA -> RGB): on a 40x slide the level read for the tissue mask took ~5x the decode.
Where an OpenSlide level *is* one tiled TIFF page (Aperio SVS, generic tiled TIFF) with plain 8-bit RGB tiles,
this module decodes the page's tiles itself, on threads (imagecodecs releases the GIL), into the same pixels
(tests compare against OpenSlide on real and synthetic slides). Anything else - other vendors, JPEG 2000,
fluorescence channels, a colour fix-up, a page that does not match the level - is not claimed and the caller
reads through OpenSlide as before; so is a level whose tiles this module fails to decode. Missing tiles are white,
as OpenSlide's transparent pixels composited onto white; JPEG colour follows the photometric tag, as in OpenSlide.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# OpenSlide vendors whose levels are exactly the file's tiled TIFF pages, pixel for pixel.
TIFF_PAGE_VENDORS = frozenset({"aperio", "generic-tiff"})
# TIFF compression codes whose 8-bit RGB tiles decode to the same pixels everywhere (lossless) or through the same
# libjpeg-turbo IDCT as OpenSlide's (JPEG, 7). JPEG 2000 (Aperio 33003/33005) is left to OpenSlide.
_CODECS = frozenset({1, 5, 7, 8, 32946, 50000})  # none, LZW, JPEG, Adobe deflate, deflate, zstd
_RGB, _YCBCR, _JPEG = 2, 6, 7


class TiffLevels:
    """Tiled TIFF pages of one slide that can be decoded directly, keyed by OpenSlide level."""

    def __init__(self, tif: Any, pages: dict[int, Any], threads: int) -> None:
        self._tif = tif
        self._pages = pages
        self._threads = max(1, threads)
        self._lock = threading.RLock()  # one file handle: reads are serialised, decodes are not

    @classmethod
    def open(
        cls, path: Path, vendor: str | None, level_dimensions: tuple[tuple[int, int], ...], threads: int
    ) -> TiffLevels | None:
        """The decodable levels of `path`, or None where this shortcut does not apply (OpenSlide reads)."""
        if vendor not in TIFF_PAGE_VENDORS or not path.is_file():
            return None
        try:
            import tifffile

            tif = tifffile.TiffFile(path)
        except Exception:  # OpenSlide opened it: whatever tifffile dislikes, OpenSlide still reads it
            return None
        by_size: dict[tuple[int, int], Any] = {}
        for page in tif.pages:
            if _decodable(page):
                by_size.setdefault((int(page.imagewidth), int(page.imagelength)), page)  # type: ignore[union-attr]
        pages = {lv: by_size[dims] for lv, dims in enumerate(level_dimensions) if dims in by_size}
        if not pages:
            tif.close()
            return None
        return cls(tif, pages, threads)

    def has_level(self, level: int) -> bool:
        return level in self._pages

    def bands(self, level: int, band_rows: int) -> Iterator[np.ndarray]:
        """The whole level as consecutive RGB uint8 bands of `band_rows` rows (the last may be shorter). Tiles are
        decoded straight into the band (a tile row that straddles two bands goes through one row of scratch), so
        memory stays at one band, as with OpenSlide's banded read."""
        page = self._pages[level]
        width, height, th = int(page.imagewidth), int(page.imagelength), int(page.tilelength)
        band_start = 0
        band = np.empty((min(band_rows, height), width, 3), dtype=np.uint8)
        with ThreadPoolExecutor(self._threads) as pool:
            for ty in range(-(-height // th)):
                y0, rows = ty * th, min(th, height - ty * th)
                at = y0 - band_start
                if at + rows <= len(band):  # the tile row lies inside this band
                    self._decode_row(page, pool, ty, band[at : at + rows])
                    source, done = None, rows
                else:
                    source, done = np.empty((rows, width, 3), dtype=np.uint8), 0
                    self._decode_row(page, pool, ty, source)
                while True:
                    if source is not None:
                        at = y0 + done - band_start
                        take = min(rows - done, len(band) - at)
                        band[at : at + take] = source[done : done + take]
                        done += take
                    if y0 + done - band_start == len(band):  # band full: hand it out, start the next
                        yield band
                        band_start += len(band)
                        if band_start >= height:
                            return
                        band = np.empty((min(band_rows, height - band_start), width, 3), dtype=np.uint8)
                    if done == rows:
                        break

    def _decode_row(self, page: Any, pool: ThreadPoolExecutor, ty: int, out: np.ndarray) -> None:
        """Decode tile row `ty` into `out` (its rows x the level's width x 3), the row's tiles on the pool."""
        rows, width = out.shape[:2]
        tw = int(page.tilewidth)
        across = -(-width // tw)
        first = ty * across
        offsets = page.dataoffsets[first : first + across]
        counts = page.databytecounts[first : first + across]
        # Tile by tile: tifffile's read_segments misplaces the tiles after a missing one (byte count 0).
        raw: list[tuple[bytes | None, int]] = []
        with self._lock:
            fh = self._tif.filehandle
            for i, (offset, count) in enumerate(zip(offsets, counts, strict=True)):
                if count > 0:
                    fh.seek(int(offset))
                    raw.append((fh.read(int(count)), first + i))
                else:
                    raw.append((None, first + i))

        def decode(item: tuple[bytes | None, int]) -> None:
            data, index = item
            x = (index - first) * tw
            cols = min(tw, width - x)
            tile: Any  # an ndarray whose dimensions depend on the codec, or None for a missing tile
            if not data:
                tile = None
            elif int(page.compression) == _JPEG:
                tile = _decode_jpeg(page, data)
            else:  # lossless codecs, predictors included: tifffile's own decoder
                tile = page.decode(data, index)[0]
            if tile is None:  # a tile the scanner never wrote: OpenSlide shows it transparent, composited to white
                out[:, x : x + cols] = 255
                return
            tile = tile.reshape(tile.shape[-3:])  # (1, h, w, 3) from tifffile; edge tiles may come cropped
            if tile.shape[0] < rows or tile.shape[1] < cols or tile.shape[2] != 3:
                raise ValueError(f"tile {index} decoded to {tile.shape}, expected at least {rows} x {cols} x 3")
            out[:, x : x + cols] = tile[:rows, :cols]

        list(pool.map(decode, raw))

    def close(self) -> None:
        self._tif.close()


def _decode_jpeg(page: Any, data: bytes) -> np.ndarray:
    """A JPEG tile as OpenSlide (libtiff) decodes it: the TIFF's photometric tag, not the JPEG's own markers, says
    whether to convert from YCbCr. tifffile trusts a JFIF marker instead, so a YCbCr JPEG filed as RGB would come out
    in true colours here and as YCbCr-shown-as-RGB in every tile stage 2 reads through OpenSlide: the mask would
    look fine while the features are wrong (the glass-colour check on the QC image must see what stage 2 sees)."""
    import imagecodecs

    colorspace = "YCBCR" if int(page.photometric) == _YCBCR else "RGB"
    return imagecodecs.jpeg_decode(data, tables=page.jpegtables, colorspace=colorspace, outcolorspace="RGB")


def _decodable(page: Any) -> bool:
    """A tiled, contiguous, 8-bit, 3-sample RGB page (YCbCr only inside JPEG, where the decoder converts it)."""
    try:
        photometric, compression = int(page.photometric), int(page.compression)
        return (
            bool(page.is_tiled)
            and int(page.imagedepth) == 1
            and int(page.samplesperpixel) == 3
            and not page.extrasamples
            and int(page.planarconfig) == 1
            and int(page.bitspersample) == 8
            and page.dtype == np.uint8
            and compression in _CODECS
            and (photometric == _RGB or (photometric == _YCBCR and compression == _JPEG))
        )
    except (AttributeError, TypeError, ValueError):
        return False
