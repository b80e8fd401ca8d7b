"""Quality-control pictures of one slide: the thumbnail with tissue contours and kept tiles, PNG writing."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from ..io.atomic import write_bytes_atomic

QC_MAX_SIDE = 2048  # longest side of a QC thumbnail, pixels
QC_FINEST_MPP = 2.0  # never draw QC finer than this: small slides get a readable picture, not a huge one


def qc_mpp_for(width: int, height: int, slide_mpp: float) -> float:
    """Resolution of the QC thumbnail: the whole slide fits in QC_MAX_SIDE pixels."""
    longest_um = max(width, height) * slide_mpp
    return max(longest_um / QC_MAX_SIDE, QC_FINEST_MPP)


def draw_qc_thumbnail(
    thumbnail: np.ndarray,
    level0_per_px: float,
    contours_level0: Iterable[np.ndarray],
    coords: np.ndarray,
    tile_size_level0: float,
) -> np.ndarray:
    """The thumbnail with tissue contours (green) and the kept tile grid (blue boxes) drawn on it."""
    img = np.ascontiguousarray(thumbnail.copy())
    size = max(1, int(round(tile_size_level0 / level0_per_px)))
    if len(coords):
        xy = np.round(np.asarray(coords, dtype=np.float64) / level0_per_px).astype(np.int32)
        for x, y in xy:
            cv2.rectangle(img, (int(x), int(y)), (int(x) + size - 1, int(y) + size - 1), (40, 90, 230), 1)
    rings = [
        np.round(np.asarray(r, dtype=np.float64) / level0_per_px).astype(np.int32).reshape(-1, 1, 2)
        for r in contours_level0
    ]
    if rings:
        cv2.polylines(img, rings, isClosed=True, color=(0, 170, 0), thickness=2)
    return img


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB (or single-channel) uint8 image as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", data)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, buf.tobytes())
