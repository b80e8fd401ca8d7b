"""Whole pyramid levels decoded straight from a TIFF's tiles (tifffile + imagecodecs), for the mask and QC read.

Reading a whole level through OpenSlide costs several passes over the pixels besides the JPEG decode (ARGB
composition, PIL conversion, RGBA -> RGB): on a 40x slide the level read for the tissue mask took ~5x the decode.
Where an OpenSlide level *is* one tiled TIFF page (Aperio SVS, generic tiled TIFF) with plain 8-bit RGB tiles,
this module decodes the page's tiles itself, on threads (imagecodecs releases the GIL), into the same pixels
(tests compare against OpenSlide on real and synthetic slides). Anything else - other vendors, JPEG 2000,
fluorescence channels, a colour fix-up, a page that does not match the level - returns None and the caller reads
through OpenSlide as before. Missing tiles are white, as OpenSlide's transparent pixels composited onto white.
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
        """The whole level as consecutive RGB uint8 bands of `band_rows` rows (the last may be shorter)."""
        page = self._pages[level]
        width, height = int(page.imagewidth), int(page.imagelength)
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = -(-width // tw)
        pending: list[np.ndarray] = []  # decoded rows not yet handed out
        pending_rows = 0
        with ThreadPoolExecutor(self._threads) as pool:
            for ty in range(-(-height // th)):
                pending.append(self._tile_row(page, pool, ty, across, width, min(th, height - ty * th)))
                pending_rows += pending[-1].shape[0]
                while pending_rows >= band_rows:
                    rows = np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]
                    yield rows[:band_rows]
                    pending, pending_rows = [rows[band_rows:]], pending_rows - band_rows
            if pending_rows:
                yield np.concatenate(pending, axis=0)

    def _tile_row(self, page: Any, pool: ThreadPoolExecutor, ty: int, across: int, width: int, rows: int) -> np.ndarray:
        tw = int(page.tilewidth)
        out = np.empty((rows, across * tw, 3), dtype=np.uint8)
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
            if not data:  # a tile the scanner never wrote: OpenSlide shows it transparent, composited to white
                out[:, x : x + tw] = 255
                return
            tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
            if tile is None:
                out[:, x : x + tw] = 255
                return
            tile = tile.reshape(tile.shape[-3:])  # (1, h, w, 3) from tifffile; edge tiles may come cropped
            if tile.shape[0] < rows or tile.shape[2] != 3 or tile.shape[1] > tw:
                raise ValueError(f"tile {index} decoded to {tile.shape}, expected at least {rows} rows of {tw} RGB px")
            out[:, x : x + tile.shape[1]] = tile[:rows]

        list(pool.map(decode, raw))
        return out[:, :width]

    def close(self) -> None:
        self._tif.close()


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
