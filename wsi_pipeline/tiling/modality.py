"""What kind of slide this is, judged from its low-resolution image: brightfield (bright glass, stained tissue) or
fluorescence (dark background, bright signal), and whether a brightfield slide's glass has the colour glass has.

A fluorescence slide masked like a brightfield one ends as "no tissue" although tissue fills it; a brightfield slide
whose colours were read wrongly (YCbCr shown as RGB, a wrong colour profile) has strongly coloured glass. Both are
measured here so that neither passes as an ordinary "ok".
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

Modality = Literal["brightfield", "fluorescence"]

DARK_VALUE = 50  # HSV value below this is dark: a fluorescence background, or a brightfield border
GLASS_VALUE, GLASS_SATURATION = 220, 25  # bright and unsaturated: brightfield glass
FLUORESCENCE_DARK_FRACTION = 0.5  # more than half the slide dark ...
FLUORESCENCE_MAX_GLASS_FRACTION = 0.02  # ... and almost no glass: fluorescence
MAX_GLASS_CHROMA = 20.0  # CIELAB chroma of glass; clean slides measure 1-8, old yellowed ones ~12
MIN_GLASS_PIXELS = 0.01  # fraction of the image that must be glass for its colour to be measured


def detect_modality(rgb: np.ndarray) -> Modality:
    """Fluorescence when most of the image is dark and almost none of it is glass, else brightfield."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)
    v, s = hsv[..., 2], hsv[..., 1]
    dark = float((v < DARK_VALUE).mean())
    glass = float(((v >= GLASS_VALUE) & (s <= GLASS_SATURATION)).mean())
    if dark > FLUORESCENCE_DARK_FRACTION and glass < FLUORESCENCE_MAX_GLASS_FRACTION:
        return "fluorescence"
    return "brightfield"


def background_rgb(rgb: np.ndarray, tissue: np.ndarray) -> tuple[int, int, int] | None:
    """Median colour of the bright non-tissue pixels (the glass), or None when too little glass is visible."""
    img = np.ascontiguousarray(rgb[::4, ::4, :3])  # every 16th pixel: plenty for a median, 16x less work
    tissue = tissue[::4, ::4]
    v = img.max(axis=2)
    glass = ~tissue & (v >= 100)  # leave out black borders and ink
    if glass.mean() < MIN_GLASS_PIXELS:
        return None
    med = np.median(img[glass], axis=0)
    return (int(med[0]), int(med[1]), int(med[2]))


# sRGB (D65) -> CIE XYZ, and the D65 white point: the constants OpenCV's RGB2Lab uses (a test checks against it).
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE_XYZ = np.array([0.950456, 1.0, 1.088754])


def glass_chroma(colour: tuple[int, int, int]) -> float:
    """CIELAB chroma (distance from grey) of one RGB colour. Closed form rather than cv2.cvtColor: OpenCV builds
    its Lab tables on first use (~70 ms, paid by every tile job for one pixel)."""
    c = np.asarray(colour, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = _RGB_TO_XYZ @ linear / _WHITE_XYZ
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)
    return float(np.hypot(500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])))


def colour_warning(colour: tuple[int, int, int] | None) -> str | None:
    """A one-line warning when brightfield glass is strongly coloured, else None."""
    if colour is None:
        return None
    chroma = glass_chroma(colour)
    if chroma <= MAX_GLASS_CHROMA:
        return None
    return (
        f"background colour RGB {colour} is far from neutral glass (chroma {chroma:.0f} > {MAX_GLASS_CHROMA:.0f}): "
        "colours may be read wrongly (channels swapped, YCbCr shown as RGB, a wrong colour profile); check the "
        "QC thumbnail before trusting this slide's features"
    )
