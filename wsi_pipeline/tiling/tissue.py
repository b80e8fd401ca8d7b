"""Tissue mask of a slide from a low-resolution RGB image: HSV saturation + Otsu, pen and border rejection.

The caller reads the slide at about `TissueParams.mask_mpp` µm/px and passes the image with its exact
resolution; every size here is in microns (or mm²) and converted with that resolution, so the result does not
depend on which pyramid level was read. Outputs: a boolean mask, its contours as pixel-edge polygons (outer
ring + holes), a PNG and a QuPath-compatible GeoJSON in level-0 pixels. An empty mask is a valid result.

Coordinates: mask pixel (col x, row y) covers the square [x, x+1] x [y, y+1]; contour vertices are pixel
*corners*, so a polygon's area equals its pixel count exactly, and level-0 coordinates are these values times
`level0_scale` (level-0 pixels per mask pixel).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..io.atomic import write_bytes_atomic
from .config import TissueParams

log = logging.getLogger(__name__)

TISSUE_COLOR_RGB = (0, 170, 0)


@dataclass
class TissuePolygon:
    """One tissue piece: the outer ring and its hole rings, (K, 2) float x, y in mask pixel-edge coordinates.
    Rings are open (last vertex != first); the outer has positive shoelace area, holes negative."""

    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    @property
    def area_px(self) -> float:
        return _signed_area(self.outer) + sum(_signed_area(h) for h in self.holes)


@dataclass
class TissueMask:
    mask: np.ndarray  # bool (H, W) at `mpp`
    mpp: float  # µm per mask pixel
    contours: list[TissuePolygon]
    threshold: float  # the saturation threshold used (0-255)
    _integral: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def area_mm2(self) -> float:
        return float(np.count_nonzero(self.mask)) * (self.mpp / 1000.0) ** 2

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    def tissue_fractions(self, boxes_level0: np.ndarray, level0_scale: float) -> np.ndarray:
        """Fraction of each level-0 box (N, 4: x0, y0, w, h) covered by tissue, area-weighted over partial
        mask pixels; parts of a box outside the mask count as glass. `level0_scale`: level-0 px per mask px"""
        boxes = np.asarray(boxes_level0, dtype=np.float64).reshape(-1, 4) / float(level0_scale)
        if self._integral is None:
            # Integral image: any box sum in O(1); float64 so bilinear weights below stay exact enough.
            self._integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_64F)
        x0, y0, w, h = boxes.T
        x1, y1 = x0 + w, y0 + h
        s = self._integral
        covered = _cum(s, x1, y1) - _cum(s, x0, y1) - _cum(s, x1, y0) + _cum(s, x0, y0)
        area = w * h
        out = np.divide(covered, area, out=np.zeros_like(covered), where=area > 0)
        return np.clip(out, 0.0, 1.0)

    def tissue_fraction(self, x0: float, y0: float, w: float, h: float, level0_scale: float) -> float:
        return float(self.tissue_fractions(np.array([[x0, y0, w, h]]), level0_scale)[0])

    def to_geojson(self, level0_scale: float, slide_id: str) -> dict:
        """A FeatureCollection of tissue Polygons in level-0 pixels (x right, y down) that QuPath imports as
        annotations classified "Tissue". Rings are closed; outer rings CCW (positive shoelace), holes CW."""
        features = []
        for i, poly in enumerate(self.contours):
            rings = [_closed(poly.outer * level0_scale)] + [_closed(h * level0_scale) for h in poly.holes]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "name": f"{slide_id} tissue {i + 1}",
                        "classification": {"name": "Tissue", "color": list(TISSUE_COLOR_RGB)},
                        "isLocked": False,
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}


def _cum(s: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Tissue area in [0, x] x [0, y] (mask pixel units, real-valued). The integral image holds it exactly at
    integer corners and, since the mask is constant per pixel, it is bilinear in between."""
    hh, ww = s.shape[0] - 1, s.shape[1] - 1
    if hh == 0 or ww == 0:
        return np.zeros_like(x)
    x = np.clip(x, 0, ww)
    y = np.clip(y, 0, hh)
    i = np.minimum(np.floor(x).astype(np.int64), ww - 1)
    j = np.minimum(np.floor(y).astype(np.int64), hh - 1)
    fx, fy = x - i, y - j
    return (
        (1 - fx) * (1 - fy) * s[j, i]
        + fx * (1 - fy) * s[j, i + 1]
        + (1 - fx) * fy * s[j + 1, i]
        + fx * fy * s[j + 1, i + 1]
    )


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = [[float(x), float(y)] for x, y in ring]
    return pts + [pts[0]]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# ----------------------------------------------------------------------------------------------------
# mask


def _px(um: float, mpp: float) -> int:
    return int(round(um / mpp))


def _ellipse(diameter_px: int) -> np.ndarray:
    # Odd sizes only: an even kernel has no centre pixel, and a close or open with it shifts the mask.
    d = diameter_px | 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB(A) uint8 image of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[2] == 4:
        # Transparent pixels (outside the scanned area in OpenSlide's read_region) are glass, not black.
        alpha = arr[..., 3:4]
        arr = np.where(alpha == 0, np.uint8(255), arr[..., :3])
    return np.ascontiguousarray(arr[..., :3])


def saturation_channel(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """The blurred HSV saturation (uint8, H x W) that the threshold is applied to."""
    return _blurred(cv2.cvtColor(_as_rgb(rgb), cv2.COLOR_RGB2HSV)[..., 1], mpp, params)


def _blurred(channel: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    k = _px(params.blur_um, mpp)
    if k >= 3:
        channel = cv2.medianBlur(np.ascontiguousarray(channel), k | 1)  # odd aperture; keeps tissue edges sharp
    return channel


def pen_mask(hsv: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """Blue, green and black ink (bool H x W), opened to ignore lone dark nuclei and grown over its halo."""
    # cv2.inRange: inclusive per-channel bounds in one SIMD pass (OpenCV's 8-bit hue runs 0-179)
    blue = cv2.inRange(hsv, (params.pen_blue_hue[0], params.pen_min_saturation, 0), (params.pen_blue_hue[1], 255, 255))
    green = cv2.inRange(
        hsv, (params.pen_green_hue[0], params.pen_min_saturation, 0), (params.pen_green_hue[1], 255, 255)
    )
    black = cv2.inRange(hsv, (0, 0, 0), (255, params.pen_black_max_saturation, params.pen_black_max_value))
    pen: np.ndarray = cv2.bitwise_or(cv2.bitwise_or(blue, green), black)
    k = _px(params.pen_min_width_um, mpp)
    if k >= 2:
        pen = cv2.morphologyEx(pen, cv2.MORPH_OPEN, _ellipse(k))
    k = _px(params.pen_dilate_um, mpp)
    if k >= 1:
        pen = cv2.dilate(pen, _ellipse(2 * k + 1))
    return pen.astype(bool)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold (OpenCV) of uint8 values; tissue is `value > threshold`; 255 for no values."""
    values = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1, 1)
    if values.size == 0:
        return 255.0
    t, _ = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def compute_tissue_mask(
    rgb: np.ndarray, mpp: float, params: TissueParams | None = None, modality: str = "brightfield"
) -> TissueMask:
    """Tissue mask of `rgb` (uint8 H x W x 3 at `mpp` µm/px, read near `params.mask_mpp`; no resampling here
    so the caller's level-0 scale stays exact). A blank image gives an empty mask, not an error.

    Brightfield: stained tissue is saturated, glass is bright and grey. Fluorescence: tissue is signal (any
    channel) over a dark background, so the mask thresholds intensity instead; ink and glass rules do not apply."""
    params = params or TissueParams()
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rgb = _as_rgb(rgb)
    if abs(mpp / params.mask_mpp - 1) > 0.5:
        log.debug("tissue mask computed at %.3f µm/px, configured mask_mpp is %.3f", mpp, params.mask_mpp)
    if modality == "fluorescence":
        signal = _blurred(rgb.max(axis=2), mpp, params)
        excluded = np.zeros(signal.shape, dtype=bool)
        threshold = max(otsu_threshold(signal), float(params.min_intensity))
        tissue: np.ndarray = (signal > threshold).astype(np.uint8)
    else:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        sat = saturation_channel(rgb, mpp, params)
        excluded = hsv[..., 2] <= params.black_max_value  # black borders / scanner edges
        if params.remove_pen:
            excluded |= pen_mask(hsv, mpp, params)
        if params.saturation_threshold == "otsu":
            # Ink and black borders are left out of the histogram so they cannot drag the threshold.
            threshold = max(otsu_threshold(sat[~excluded]), float(params.min_saturation))
        else:
            threshold = float(params.saturation_threshold)
        background = (hsv[..., 2] >= params.background_min_value) & (sat <= params.background_max_saturation)
        tissue = ((sat > threshold) & ~excluded & ~background).astype(np.uint8)

    k = _px(params.close_um, mpp)
    if k >= 2:
        tissue = cv2.morphologyEx(tissue, cv2.MORPH_CLOSE, _ellipse(k))
    k = _px(params.open_um, mpp)
    if k >= 2:
        tissue = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, _ellipse(k))
    tissue &= ~excluded  # closing must not bridge back over ink or borders
    px_per_mm2 = (1000.0 / mpp) ** 2
    tissue = _fill_holes(tissue, np.inf if params.fill_holes else params.min_hole_area_mm2 * px_per_mm2)
    tissue = _drop_small(tissue, params.min_tissue_area_mm2 * px_per_mm2)
    mask = tissue.astype(bool)
    return TissueMask(mask=mask, mpp=float(mpp), contours=mask_polygons(mask), threshold=float(threshold))


def _fill_holes(tissue: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill glass regions enclosed by tissue with area below `max_area_px` (inf: all). Glass is 4-connected,
    the dual of 8-connected tissue, as in cv2.findContours."""
    if max_area_px <= 0 or not tissue.any():
        return tissue
    n, labels, stats, _ = cv2.connectedComponentsWithStats(1 - tissue, connectivity=4)
    hh, ww = tissue.shape
    x, y, w, h, area = (stats[:, i] for i in range(5))
    enclosed = (x > 0) & (y > 0) & (x + w < ww) & (y + h < hh)
    fill = enclosed & (area < max_area_px)
    fill[0] = False  # label 0 is the tissue itself
    return _relabel(tissue, labels, stats, fill, 1)


def _drop_small(tissue: np.ndarray, min_area_px: float) -> np.ndarray:
    if min_area_px <= 0 or not tissue.any():
        return tissue
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    drop = stats[:, cv2.CC_STAT_AREA] < min_area_px
    drop[0] = False  # label 0 is the glass
    return _relabel(tissue, labels, stats, drop, 0)


def _relabel(tissue: np.ndarray, labels: np.ndarray, stats: np.ndarray, change: np.ndarray, value: int) -> np.ndarray:
    """`tissue` with the pixels of the components flagged in `change` set to `value`: a few components are set
    inside their bounding boxes (cheap), many in one pass over the whole label image."""
    ids = np.flatnonzero(change)
    if len(ids) == 0:
        return tissue
    out = tissue.copy()
    if int(stats[ids, cv2.CC_STAT_AREA].sum()) * 4 > tissue.size or len(ids) > 256:
        out[change[labels]] = value
        return out
    for i in ids.tolist():
        x, y, w, h = (int(v) for v in stats[i, :4])
        box = out[y : y + h, x : x + w]
        box[labels[y : y + h, x : x + w] == i] = value
    return out


# ----------------------------------------------------------------------------------------------------
# contours: cv2 traces boundary pixel centres; each chain becomes the pixel-edge ("crack") polygon so that
# polygon areas equal pixel counts and rasterising the polygons gives back the mask exactly.

# Index of a step (dx, dy) in {-1, 0, 1}^2: (dx + 1) * 3 + (dy + 1). Corners of a pixel, clockwise on screen:
# 0 = top-left, 1 = top-right, 2 = bottom-right, 3 = bottom-left.
_CORNER = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
_ENTER = np.full(9, -1)  # corner of the pixel stepped into where the boundary walk arrives
_LEAVE = np.full(9, -1)  # corner of the pixel stepped out of where the walk leaves
for (_dx, _dy), _s, _e in [
    ((1, 0), 0, 1),
    ((0, 1), 1, 2),
    ((-1, 0), 2, 3),
    ((0, -1), 3, 0),
    ((1, -1), 3, 1),
    ((1, 1), 0, 2),
    ((-1, 1), 1, 3),
    ((-1, -1), 2, 0),
]:
    _ENTER[(_dx + 1) * 3 + _dy + 1], _LEAVE[(_dx + 1) * 3 + _dy + 1] = _s, _e


def _crack_ring(chain: np.ndarray) -> np.ndarray:
    """Pixel-edge polygon around a closed 8-connected chain of boundary pixel centres (K, 2) int x, y. The
    walk keeps tissue on its right on screen: positive shoelace for outers, negative for holes."""
    pts = chain.reshape(-1, 2).astype(np.int64)
    if len(pts) == 1:
        return pts[0] + _CORNER
    pts = pts[::-1]  # cv2 walks outers counter-clockwise on screen and holes clockwise: reverse both
    step_in = pts - np.roll(pts, 1, axis=0)
    step_out = np.roll(pts, -1, axis=0) - pts
    code_in = (step_in[:, 0] + 1) * 3 + step_in[:, 1] + 1
    code_out = (step_out[:, 0] + 1) * 3 + step_out[:, 1] + 1
    start, end = _ENTER[code_in], _LEAVE[code_out]
    if (start < 0).any() or (end < 0).any():
        raise ValueError("contour chain is not 8-connected")
    n = (end - start) % 4
    # A diagonal dead end (walk in and straight back out) exposes all four sides: go right round the pixel.
    u_turn = (n == 0) & (code_out == 8 - code_in) & (step_in[:, 0] != 0) & (step_in[:, 1] != 0)
    n = n + 4 * u_turn
    counts = n + 1
    owner = np.repeat(np.arange(len(pts)), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    corners = (start[owner] + offset) % 4
    ring = pts[owner] + _CORNER[corners]
    return _simplify(ring)


def _simplify(ring: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices (exact: the polygon is unchanged)."""
    keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)
    ring = ring[keep] if keep.any() else ring[:1]
    if len(ring) < 3:
        return ring
    prev, nxt = np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0)
    d_in, d_out = ring - prev, nxt - ring
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    dot = d_in[:, 0] * d_out[:, 0] + d_in[:, 1] * d_out[:, 1]
    # Straight-through vertices go; a 180-degree turn (a 1-pixel spike's tip) must stay.
    return ring[~((cross == 0) & (dot > 0))]


def mask_polygons(mask: np.ndarray) -> list[TissuePolygon]:
    """Tissue pieces of a bool mask as polygons with holes (RETR_CCOMP pairs each hole with its outer)."""
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.uint8), 1)  # tissue touching the image edge still gets a closed outline
    found, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
    polygons = []
    for i, chain in enumerate(found):
        if hierarchy[i, 3] != -1:
            continue
        outer = _crack_ring(chain.reshape(-1, 2) - 1)
        holes = []
        child = hierarchy[i, 2]
        while child != -1:
            holes.append(_crack_ring(found[child].reshape(-1, 2) - 1))
            child = hierarchy[child, 0]
        polygons.append(TissuePolygon(outer=outer, holes=holes))
    return polygons


# ----------------------------------------------------------------------------------------------------
# outputs


def write_mask_png(mask: TissueMask, path: str | os.PathLike[str]) -> Path:
    """The mask as an 8-bit PNG (255 = tissue), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", mask.mask.astype(np.uint8) * 255)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, buf.tobytes())
    return path


def write_geojson(mask: TissueMask, path: str | os.PathLike[str], level0_scale: float, slide_id: str) -> Path:
    """Tissue contours as a GeoJSON FeatureCollection in level-0 pixels (QuPath: File > Import objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(mask.to_geojson(level0_scale, slide_id)).encode())
    return path


def render_overlay(rgb: np.ndarray, mask: TissueMask) -> np.ndarray:
    """QC picture: `rgb` (same size as the mask) with glass greyed out and tissue contours drawn."""
    img = _as_rgb(rgb).copy()
    if img.shape[:2] != mask.mask.shape:
        raise ValueError(f"image {img.shape[:2]} and mask {mask.mask.shape} differ in size")
    glass = ~mask.mask
    img[glass] = (0.4 * img[glass] + 0.6 * 128).astype(np.uint8)
    rings = [np.round(r).astype(np.int32).reshape(-1, 1, 2) for p in mask.contours for r in [p.outer, *p.holes]]
    if rings:
        cv2.polylines(img, rings, isClosed=True, color=TISSUE_COLOR_RGB, thickness=1)
    return img
