"""Slide geometry: tissue regions, pen marks and the spec a written slide is described by.

Everything here is plain geometry in level-0 pixel coordinates, independent of pixels and file formats, so
tests can assert against it; ``mix`` is the deterministic per-tile hash the renderer and demo share. A region's
texture (``SyntheticSpec.textures``, one name per region) is ground truth: ``texture_at`` / ``texture_fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

PEN_RGB = {"blue": (25, 50, 190), "green": (30, 140, 60), "black": (22, 22, 28)}
TISSUE = "tissue"  # the texture label of regions drawn with the stain preset and nuclei_density (no named texture)


@dataclass(frozen=True)
class Region:
    """One tissue region in level-0 pixel coordinates; ``x1``/``y1`` are exclusive bounds."""

    kind: Literal["ellipse", "rectangle"]
    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if self.kind not in ("ellipse", "rectangle") or not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"invalid region {self}: kind must be ellipse/rectangle and x1 > x0, y1 > y0")

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean grid (len(ys), len(xs)): which points (level-0 coordinates) lie inside."""
        if self.kind == "rectangle":
            return ((ys >= self.y0) & (ys < self.y1))[:, None] & ((xs >= self.x0) & (xs < self.x1))[None, :]
        rx, ry = (self.x1 - self.x0) / 2, (self.y1 - self.y0) / 2
        dx, dy = ((xs - self.x0 - rx) / rx) ** 2, ((ys - self.y0 - ry) / ry) ** 2
        return dy[:, None] + dx[None, :] < 1.0

    def intersects(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        return self.x0 < x1 and x0 < self.x1 and self.y0 < y1 and y0 < self.y1


@dataclass(frozen=True)
class PenMark:
    """An ink stroke: colour name, polyline (level-0 points), stroke thickness and bounding box."""

    color: str
    points: tuple[tuple[float, float], ...]
    thickness: float
    box: Region


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything a test needs to know about a written slide."""

    path: Path
    width: int
    height: int
    mpp: float | None
    fmt: str
    regions: tuple[Region, ...]
    tile_size: int
    level_downsamples: tuple[float, ...]
    seed: int
    level_dimensions: tuple[tuple[int, int], ...] = ()  # (width, height) per level; derived when empty
    stain: str = "he"
    nuclei_density: float = 1.0
    pen_marks: tuple[PenMark, ...] = ()
    border_width: int = 0
    compression: str = "jpeg"
    jpeg_quality: int = 80
    associated: tuple[str, ...] = ()
    textures: tuple[str, ...] = ()  # one texture name per region; () = every region is TISSUE

    def __post_init__(self) -> None:
        if not self.level_dimensions:  # levels are ceil-sized, as tifffile and OpenSlide report them
            dims = tuple((math.ceil(self.width / d), math.ceil(self.height / d)) for d in self.level_downsamples)
            object.__setattr__(self, "level_dimensions", dims)
        if self.textures and len(self.textures) != len(self.regions):
            raise ValueError(f"{len(self.textures)} textures for {len(self.regions)} regions; give one per region")

    @property
    def region_textures(self) -> tuple[str, ...]:
        """The texture of each region: its name in ``textures``, or TISSUE for a slide without named textures."""
        return self.textures or (TISSUE,) * len(self.regions)

    def texture_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Texture names (grid len(ys) x len(xs) of str) at level-0 points; '' outside every region. Where
        regions overlap the later one is drawn on top, and counts."""
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        names = ("",) + self.region_textures
        idx = np.zeros((len(ys), len(xs)), np.int64)
        for i, r in enumerate(self.regions, start=1):
            idx[r.contains(xs, ys)] = i
        return np.asarray(names, dtype=object)[idx].astype(str)

    def texture_fraction(self, x0: float, y0: float, x1: float, y1: float, samples: int = 64) -> dict[str, float]:
        """Fraction of the level-0 box [x0, x1) x [y0, y1) covered by each texture ('' = background), sampled at
        ``samples`` x ``samples`` cell centres; fractions sum to 1."""
        xs = x0 + (np.arange(samples) + 0.5) * (x1 - x0) / samples
        ys = y0 + (np.arange(samples) + 0.5) * (y1 - y0) / samples
        names, counts = np.unique(self.texture_at(xs, ys), return_counts=True)
        return {str(n): float(c) / samples**2 for n, c in zip(names, counts, strict=True)}

    @property
    def pen_boxes(self) -> dict[str, tuple[float, float, float, float]]:
        return {p.color: (p.box.x0, p.box.y0, p.box.x1, p.box.y1) for p in self.pen_marks}

    def truth_mask(self, downsample: float) -> np.ndarray:
        """Regions rasterised at ``downsample``: a pixel is tissue when its centre lies inside a region.

        A level's downsample as a reader reports it (e.g. OpenSlide's 63.99 for a ceil-sized level 64) snaps
        to the nominal one, so the mask has exactly that level's shape."""
        for d, dims in zip(self.level_downsamples, self.level_dimensions, strict=True):
            if abs(downsample / d - 1) < 0.01 and dims == (
                round(self.width / downsample),
                round(self.height / downsample),
            ):
                downsample = d
        h, w = math.ceil(self.height / downsample), math.ceil(self.width / downsample)
        xs, ys = (np.arange(w) + 0.5) * downsample, (np.arange(h) + 0.5) * downsample
        return union(self.regions, xs, ys)


def union(regions: Sequence[Region], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Union of region masks over the grid, evaluating each region only inside its bounding box."""
    out = np.zeros((len(ys), len(xs)), bool)
    for r in regions:
        i0, i1 = np.searchsorted(ys, [r.y0, r.y1])
        j0, j1 = np.searchsorted(xs, [r.x0, r.x1])
        if i1 > i0 and j1 > j0:
            out[i0:i1, j0:j1] |= r.contains(xs[j0:j1], ys[i0:i1])
    return out


def mix(*keys: int) -> int:
    """Deterministic 64-bit hash (splitmix64 chain): a per-tile random choice without an RNG per tile."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 29)


def default_regions(width: int, height: int, seed: int) -> tuple[Region, ...]:
    """Three non-overlapping blobs (two ellipses, one rectangle) in cells of a 3x2 grid, 5% from the edges.

    Three cells stay free so pen marks can be placed away from tissue."""
    rng = np.random.default_rng([seed, 7])
    mx, my = 0.05 * width, 0.05 * height
    cw, ch = (width - 2 * mx) / 3, (height - 2 * my) / 2
    shapes: tuple[Literal["ellipse", "rectangle"], ...] = ("ellipse", "ellipse", "rectangle")
    kinds = [shapes[i] for i in rng.permutation(len(shapes))]  # the same draw as permuting the names
    out = []
    for kind, cell in zip(kinds, sorted(rng.choice(6, size=3, replace=False)), strict=True):
        cx0, cy0 = mx + (cell % 3) * cw, my + (cell // 3) * ch
        sw, sh = rng.uniform(0.55, 0.8) * cw, rng.uniform(0.55, 0.8) * ch
        x0 = cx0 + 0.05 * cw + rng.uniform(0, 0.9 * cw - sw)
        y0 = cy0 + 0.05 * ch + rng.uniform(0, 0.9 * ch - sh)
        x0, y0 = float(x0), float(y0)
        out.append(Region(kind, round(x0, 1), round(y0, 1), round(x0 + sw, 1), round(y0 + sh, 1)))
    return tuple(out)


def place_pens(
    colors: Sequence[str], width: int, height: int, regions: Sequence[Region], seed: int
) -> tuple[PenMark, ...]:
    """Wavy thick strokes in boxes that keep clear of every region (and of each other)."""
    rng = np.random.default_rng([seed, 11])
    bw, bh = 0.16 * width, 0.09 * height
    thick = max(4.0, 0.012 * min(width, height))
    gap = 0.02 * min(width, height)
    cands = [
        (0.06 * width + i * (0.88 * width - bw) / 7, 0.06 * height + j * (0.88 * height - bh) / 7)
        for i in range(8)
        for j in range(8)
    ]
    cands = [cands[k] for k in rng.permutation(len(cands))]
    taken: list[Region] = list(regions)
    marks = []
    for color in colors:
        if color not in PEN_RGB:
            raise ValueError(f"unknown pen colour {color!r}; use one of {sorted(PEN_RGB)}")
        free = [
            (x, y)
            for x, y in cands
            if not any(r.intersects(x - gap, y - gap, x + bw + gap, y + bh + gap) for r in taken)
        ]
        if not free:
            raise ValueError(f"no room for a {color} pen mark outside the tissue regions; use a larger slide")
        x, y = free[0]
        t = np.linspace(0, 1, 48)
        px = x + thick + t * (bw - 2 * thick)
        py = y + bh / 2 + (bh / 2 - thick) * np.sin(2 * np.pi * (1.5 * t + rng.uniform()))
        pts = tuple((float(a), float(b)) for a, b in zip(px, py, strict=True))
        box = Region(
            "rectangle",
            float(px.min() - thick),
            float(py.min() - thick),
            float(px.max() + thick),
            float(py.max() + thick),
        )
        taken.append(box)
        marks.append(PenMark(color, pts, thick, box))
    return tuple(marks)
