"""One slide reader over two backends: OpenSlide (every format OpenSlide 4 reads) and TiffSlide (OME-TIFF, flat TIFF).

`open_slide` validates the path, picks a backend (`auto` tries OpenSlide, then TiffSlide), resolves the resolution
(metadata or an explicit override, never a guess) and returns a `Slide` whose `read_region` gives RGB uint8 arrays.
Every failure is a `SlideError` whose one-line message names the file and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from ..errors import MissingMPPError, SlideError, first_line
from ..machine import usable_cpus
from .dicom import ColourCorrection, find_mislabelled_ycbcr, ycbcr_to_rgb
from .tiff_levels import TiffLevels

Backend = Literal["auto", "openslide", "tiffslide"]
log = logging.getLogger(__name__)

# Outside this range a resolution is a metadata error (e.g. a 72 dpi default), not a microscope.
MPP_PLAUSIBLE = (0.05, 50.0)
# Bands of this many rows keep memory bounded when a whole level (or a flat slide) is downsampled for the mask.
BAND_ROWS = 4096
# Rows per strip when a large area is decoded on several threads.
STRIP_ROWS = 512


@dataclass(frozen=True)
class SlideInfo:
    """What the pipeline records about a slide; JSON-serialisable via `to_dict`."""

    path: str
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str  # "metadata", "override" or "missing"
    objective_power: float | None
    associated_images: tuple[str, ...]
    file_size: int
    mtime: float
    # What the reader does to the backend's pixels to make them right, e.g. "ycbcr-to-rgb: ..." for DICOM frames
    # whose header says RGB over YCbCr JPEG data; None when the pixels are used as decoded.
    colour_correction: str | None = None
    properties: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def mpp(self) -> float | None:
        """Mean of MPP x and y (slides are near-square-pixel; tiling uses one value)."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("properties")
        d["mpp"] = self.mpp
        return d


def _resolve_path(path: Path) -> Path:
    """Check existence/size; a DICOM folder resolves to one of its .dcm files (OpenSlide opens the set from it)."""
    if not path.exists():
        raise SlideError(
            f"{path}: file not found; check the 'path' column of the sample sheet (paths are relative "
            "to the sample sheet's folder)"
        )
    if path.is_dir():
        dcm = sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
        if not dcm:
            raise SlideError(
                f"{path}: is a directory but not a DICOM slide (no .dcm files inside); point 'path' at "
                "a slide file, or at a folder holding one DICOM WSI series"
            )
        # A series folder may also hold non-image instances (reports, annotations): open a WSI instance.
        wsi = [p for p in dcm if _is_dicom_wsi(p)]
        return (wsi or dcm)[0]
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes); the copy or download failed, copy the slide again")
    return path


def _is_dicom_wsi(path: Path) -> bool:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) == "dicom"  # reads the header only
    except Exception:  # unreadable file: not a candidate
        return False


class Slide:
    """An open slide. Use as a context manager or call `close()`; one handle per process/worker."""

    def __init__(self, handle: Any, backend: str, path: Path, opened_path: Path, mpp: float | None) -> None:
        self._handle = handle
        self.backend = backend
        self.path = path
        self._opened_path = opened_path
        self.info = self._read_info(mpp)
        self._colour: ColourCorrection | None = None
        self._direct: TiffLevels | Literal[False] | None = None  # opened on the first whole-level read
        if backend == "openslide" and self.info.vendor == "dicom":
            # OpenSlide trusts PhotometricInterpretation; a converter that wrote RGB over YCbCr JPEG frames would
            # otherwise give cyan tissue, a wrong mask and wrong features with status ok
            self._colour = find_mislabelled_ycbcr(opened_path, self.info.properties, self.info.level_dimensions)
            if self._colour is not None:
                self.info = replace(self.info, colour_correction=self._colour.description)

    # -- metadata -----------------------------------------------------------------------------------------------
    def _read_info(self, mpp_override: float | None) -> SlideInfo:
        h = self._handle
        props = {str(k): str(v) for k, v in dict(h.properties).items()}
        prefix = self.backend  # "openslide.mpp-x" or "tiffslide.mpp-x"
        mpp_x = _float_or_none(props.get(f"{prefix}.mpp-x"))
        mpp_y = _float_or_none(props.get(f"{prefix}.mpp-y"))
        source = "metadata"
        if mpp_override is not None:
            if not (MPP_PLAUSIBLE[0] <= mpp_override <= MPP_PLAUSIBLE[1]):
                raise SlideError(
                    f"{self.path}: MPP override {mpp_override} is outside {MPP_PLAUSIBLE}; give "
                    "microns per pixel (0.25 for 40x, 0.5 for 20x)"
                )
            mpp_x = mpp_y = float(mpp_override)
            source = "override"
        elif mpp_x is None or mpp_y is None:
            mpp_x = mpp_y = None
            source = "missing"
        elif not all(MPP_PLAUSIBLE[0] <= v <= MPP_PLAUSIBLE[1] for v in (mpp_x, mpp_y)):
            raise SlideError(
                f"{self.path}: metadata MPP {mpp_x}x{mpp_y} is implausible (a default DPI?); set the "
                "'mpp' column for this slide in the sample sheet"
            )
        st = self.path.stat()
        size = st.st_size if self.path.is_file() else sum(p.stat().st_size for p in self.path.iterdir())
        return SlideInfo(
            path=str(self.path),
            backend=self.backend,
            vendor=props.get(f"{prefix}.vendor"),
            dimensions=tuple(int(v) for v in h.dimensions),  # type: ignore[arg-type]
            level_dimensions=tuple((int(w), int(hh)) for w, hh in h.level_dimensions),
            level_downsamples=tuple(float(d) for d in h.level_downsamples),
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            mpp_source=source,
            objective_power=_float_or_none(props.get(f"{prefix}.objective-power")),
            associated_images=tuple(sorted(h.associated_images.keys())),
            file_size=int(size),
            mtime=float(st.st_mtime),
            properties=props,
        )

    def require_mpp(self) -> float:
        """The slide's MPP, or a one-line error naming the file and the sample-sheet column to set."""
        if self.info.mpp is None:
            raise MissingMPPError(
                f"{self.path}: no microns-per-pixel (MPP) in the slide metadata; set the 'mpp' "
                "column for this slide in the sample sheet (or pass --mpp), e.g. 0.5 for 20x"
            )
        return self.info.mpp

    @property
    def level_count(self) -> int:
        return len(self.info.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is not coarser than `downsample` (so tiles are only ever shrunk)."""
        best = 0
        for i, d in enumerate(self.info.level_downsamples):
            if d <= downsample * (1 + 1e-3):
                best = i
        return best

    # -- pixels -------------------------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` level pixels whose top-left is `location` in level-0 pixels.

        Transparent pixels (outside the scanned area) are composited onto white, as OpenSlide recommends;
        read or decode failures raise `SlideError`, never a blank tile.
        """
        try:
            img = self._handle.read_region(
                (int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))
            )
        except Exception as err:  # backend-specific decode errors: one line, the file, the fix
            raise SlideError(
                f"{self.path}: cannot read {size[0]}x{size[1]} px at {tuple(location)} level {level} "
                f"({first_line(err)}); the file may be truncated or corrupt, copy it again"
            ) from err
        arr = np.asarray(img)
        if self._colour is not None and level in self._colour.levels and arr.ndim == 3:
            arr = ycbcr_to_rgb(arr)  # before compositing: the white put under transparent pixels is RGB white
        if arr.ndim == 3 and arr.shape[2] == 4:
            alpha = arr[..., 3]
            rgb = arr[..., :3]
            if alpha.min() < 255:  # only pay for compositing where there is transparency
                a = alpha[..., None].astype(np.float32) / 255.0
                return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
            return cv2.cvtColor(arr, cv2.COLOR_RGBA2RGB)  # a contiguous copy, SIMD: faster than numpy slicing
        if arr.ndim == 2:
            return np.repeat(arr[..., None], 3, axis=2)
        return np.ascontiguousarray(arr[..., :3])

    def read_region_threaded(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """`read_region` of a large area, split into strips decoded on several threads: the same pixels.

        OpenSlide handles are thread-safe and release the GIL while decoding. A strip starts at a level-0 pixel, so
        strips are cut only where a level row falls on a whole level-0 pixel (else OpenSlide would interpolate a
        sub-pixel shift); with no such rows, or another backend, the area is read in one call."""
        w, h = int(size[0]), int(size[1])
        cuts = self.exact_strip_cuts(level, h) if self.backend == "openslide" and usable_cpus() > 1 else [0, h]
        if len(cuts) < 3:
            return self.read_region(location, level, size)
        ds = self.info.level_downsamples[level]
        out = np.empty((h, w, 3), dtype=np.uint8)

        def strip(i: int) -> None:
            y0, y1 = cuts[i], cuts[i + 1]
            loc = (int(location[0]), int(location[1]) + int(round(y0 * ds)))
            out[y0:y1] = self.read_region(loc, level, (w, y1 - y0))

        with ThreadPoolExecutor(min(usable_cpus(), len(cuts) - 1)) as pool:
            list(pool.map(strip, range(len(cuts) - 1)))
        return out

    def exact_strip_cuts(self, level: int, h: int) -> list[int]:
        """Row cuts [0, ..., h] about STRIP_ROWS apart, each on a row whose level-0 origin is a whole pixel."""
        ds = self.info.level_downsamples[level]
        rows = np.arange(STRIP_ROWS, h - STRIP_ROWS // 2)
        # a shift under 1e-3 px moves no uint8 value (checked against one read in tests)
        exact = rows[np.abs(rows * ds - np.round(rows * ds)) < 1e-3 * ds]
        cuts = [0]
        for y in exact.tolist():
            if y - cuts[-1] >= STRIP_ROWS:
                cuts.append(int(y))
        return cuts + [h]

    def read_level_scaled(self, level: int, scale: float) -> np.ndarray:
        """A whole level resized by `scale` (<1 shrinks), read in bands so memory stays bounded. Decoded straight
        from its TIFF tiles where that gives OpenSlide's pixels (tiff_levels.py), else through read_region; a
        level the direct decoder cannot read (an odd tile, a codec quirk, a corrupt tile) is read again through
        OpenSlide, which gives the pixels or the one-line error."""
        if self._direct is None and self.backend == "openslide" and self._colour is None:
            self._direct = (
                TiffLevels.open(self._opened_path, self.info.vendor, self.info.level_dimensions, usable_cpus()) or False
            )
        if self._direct and self._direct.has_level(level):
            try:
                return self._resize_bands(self._direct.bands(level, BAND_ROWS), level, scale)
            except Exception as err:
                log.info("%s: level %d read through OpenSlide (%s)", self.path, level, first_line(err))
        w, h = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        bands = (
            self.read_region_threaded((0, int(round(y * ds))), level, (w, min(BAND_ROWS, h - y)))
            for y in range(0, h, BAND_ROWS)
        )
        return self._resize_bands(bands, level, scale)

    def _resize_bands(self, bands: Iterator[np.ndarray], level: int, scale: float) -> np.ndarray:
        w, h = self.info.level_dimensions[level]
        out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
        resized = []
        done_rows = read_rows = 0
        for band in bands:
            read_rows += band.shape[0]
            target_rows = round(read_rows * scale) - done_rows if read_rows < h else out_h - done_rows
            if target_rows <= 0:
                continue
            resized.append(cv2.resize(band, (out_w, target_rows), interpolation=cv2.INTER_AREA))
            done_rows += target_rows
        return np.concatenate(resized, axis=0)

    def thumbnail_at_mpp(self, target_mpp: float) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide at ~`target_mpp` µm/px; returns it and its exact level-0 scale factor."""
        mpp = self.require_mpp()
        downsample = max(target_mpp / mpp, 1.0)
        level = self.best_level_for_downsample(downsample)
        level_ds = self.info.level_downsamples[level]
        scale = level_ds / downsample
        with self._uncached():
            img = self.read_level_scaled(level, scale)
        # level-0 pixels per output pixel, from the exact output size (rounding makes it differ from `downsample`)
        level0_per_px = self.info.dimensions[0] / img.shape[1]
        return img, level0_per_px

    @contextlib.contextmanager
    def _uncached(self) -> Iterator[None]:
        """No tile cache while a whole level is read once (it would only hold ~50 MB); then a fresh default one."""
        set_cache = getattr(self._handle, "set_cache", None)
        if self.backend != "openslide" or set_cache is None:
            yield
            return
        from openslide import OpenSlideCache

        set_cache(OpenSlideCache(0))
        try:
            yield
        finally:  # after a failed read the handle is in error state: the read's own error is the one to report
            with contextlib.suppress(Exception):
                set_cache(OpenSlideCache(32 << 20))  # OpenSlide's default capacity

    def associated_image(self, name: str) -> np.ndarray:
        img = np.asarray(self._handle.associated_images[name].convert("RGB"))
        if self._colour is not None and name in self._colour.associated:
            return ycbcr_to_rgb(img)
        return img

    def close(self) -> None:
        if self._direct:
            self._direct.close()
        if (close := getattr(self._handle, "close", None)) is not None:
            close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, dims={self.info.dimensions})"


def _float_or_none(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except ValueError:
        return None
    return f if math.isfinite(f) and f > 0 else None


def _open_openslide(path: Path) -> Any:
    import openslide

    return openslide.OpenSlide(str(path))


def _open_tiffslide(path: Path) -> Any:
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def _is_corrupt_not_unsupported(err: BaseException) -> bool:
    import openslide

    return isinstance(err, openslide.OpenSlideError) and not isinstance(err, openslide.OpenSlideUnsupportedFormatError)


_OPENERS = {"openslide": _open_openslide, "tiffslide": _open_tiffslide}


def open_slide(path: str | os.PathLike[str], backend: Backend = "auto", mpp: float | None = None) -> Slide:
    """Open a slide file (or DICOM folder). `mpp` overrides the metadata resolution (recorded as such)."""
    path = Path(path)
    opened = _resolve_path(path)
    order = ["openslide", "tiffslide"] if backend == "auto" else [backend]
    if backend not in ("auto", *_OPENERS):
        raise SlideError(f"{path}: unknown backend {backend!r}; use auto, openslide or tiffslide")
    errors = []
    for name in order:
        try:
            # TiffSlide parses lazily: metadata reads inside Slide() can fail too, so both are tried together.
            return Slide(_OPENERS[name](opened), name, path, opened, mpp)
        except SlideError:
            raise
        except Exception as err:  # each backend raises its own types; we report them together below
            errors.append(f"{name}: {first_line(err)}")
            if name == "openslide" and _is_corrupt_not_unsupported(err):
                # OpenSlide knows the format but the file is damaged: another reader would only read garbage.
                raise SlideError(
                    f"{path}: damaged slide file ({errors[-1]}); it is probably truncated or "
                    "corrupt, copy it again from the source"
                ) from err
            continue
    raise SlideError(
        f"{path}: not a readable slide ({'; '.join(errors)}); check the file is a whole-slide image "
        "that is complete (not truncated), or convert it to a pyramidal TIFF"
    )
