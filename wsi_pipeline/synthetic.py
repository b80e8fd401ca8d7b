"""Synthetic whole-slide images with known tissue geometry, for tests, the demo cohort and benchmarks.

Slides are real TIFF files (Aperio SVS, generic pyramidal TIFF, flat strip TIFF, OME-TIFF) that OpenSlide
and/or TiffSlide open. Pixels are drawn tile by tile from the region geometry and a small pre-rendered texture
atlas, so a 100,000 x 80,000 px slide streams to disk with flat memory. Tiles entirely inside tissue or
background come from a pool of pre-encoded variants; only tiles crossing an edge, a pen mark or the border
are rendered and encoded one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import imagecodecs
import numpy as np
import tifffile

FORMATS = ("svs", "tiff", "flat", "ome")
ATLAS = 1024  # texture atlas side (px); tiles are crops of it
POOL_TISSUE, POOL_BG = 256, 16  # pre-encoded variants per level for uniform tissue / background tiles
BACKGROUND_RGB = (240.0, 238.0, 240.0)
PEN_RGB = {"blue": (25, 50, 190), "green": (30, 140, 60), "black": (22, 22, 28)}
APERIO_HEAD = "Aperio Image Library v12.0.15"
NUCLEI_PER_UM2 = 30e-4  # at nuclei_density=1: one nucleus per ~330 um^2 of stroma


# Stain presets: RGB of eosin-stained stroma and of hematoxylin-stained nuclei.
STAINS = {
    "he": ((234, 164, 203), (92, 58, 148)),
    "he_light": ((242, 190, 218), (128, 96, 176)),
    "he_dark": ((214, 128, 178), (62, 36, 118)),
}


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

    def __post_init__(self) -> None:
        if not self.level_dimensions:  # levels are ceil-sized, as tifffile and OpenSlide report them
            dims = tuple((math.ceil(self.width / d), math.ceil(self.height / d)) for d in self.level_downsamples)
            object.__setattr__(self, "level_dimensions", dims)

    @property
    def pen_boxes(self) -> dict[str, tuple[float, float, float, float]]:
        return {p.color: (p.box.x0, p.box.y0, p.box.x1, p.box.y1) for p in self.pen_marks}

    def truth_mask(self, downsample: float) -> np.ndarray:
        """Regions rasterised at ``downsample``: a pixel is tissue when its centre lies inside a region.

        A level's downsample as a reader reports it (e.g. OpenSlide's 63.99 for a ceil-sized level 64) snaps
        to the nominal one, so the mask has exactly that level's shape."""
        for d, dims in zip(self.level_downsamples, self.level_dimensions, strict=True):
            if abs(downsample / d - 1) < 0.01 and dims == (round(self.width / downsample),
                                                           round(self.height / downsample)):
                downsample = d
        h, w = math.ceil(self.height / downsample), math.ceil(self.width / downsample)
        xs, ys = (np.arange(w) + 0.5) * downsample, (np.arange(h) + 0.5) * downsample
        return _union(self.regions, xs, ys)


def _union(regions: Sequence[Region], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Union of region masks over the grid, evaluating each region only inside its bounding box."""
    out = np.zeros((len(ys), len(xs)), bool)
    for r in regions:
        i0, i1 = np.searchsorted(ys, [r.y0, r.y1])
        j0, j1 = np.searchsorted(xs, [r.x0, r.x1])
        if i1 > i0 and j1 > j0:
            out[i0:i1, j0:j1] |= r.contains(xs[j0:j1], ys[i0:i1])
    return out


def _mix(*keys: int) -> int:
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
    kinds = rng.permutation(["ellipse", "ellipse", "rectangle"])
    out = []
    for kind, cell in zip(kinds, sorted(rng.choice(6, size=3, replace=False)), strict=True):
        cx0, cy0 = mx + (cell % 3) * cw, my + (cell // 3) * ch
        sw, sh = rng.uniform(0.55, 0.8) * cw, rng.uniform(0.55, 0.8) * ch
        x0 = cx0 + 0.05 * cw + rng.uniform(0, 0.9 * cw - sw)
        y0 = cy0 + 0.05 * ch + rng.uniform(0, 0.9 * ch - sh)
        x0, y0 = float(x0), float(y0)
        out.append(Region(str(kind), round(x0, 1), round(y0, 1), round(x0 + sw, 1), round(y0 + sh, 1)))
    return tuple(out)


def _place_pens(
    colors: Sequence[str], width: int, height: int, regions: Sequence[Region], seed: int
) -> tuple[PenMark, ...]:
    """Wavy thick strokes in boxes that keep clear of every region (and of each other)."""
    rng = np.random.default_rng([seed, 11])
    bw, bh = 0.16 * width, 0.09 * height
    thick = max(4.0, 0.012 * min(width, height))
    gap = 0.02 * min(width, height)
    cands = [(0.06 * width + i * (0.88 * width - bw) / 7, 0.06 * height + j * (0.88 * height - bh) / 7)
             for i in range(8) for j in range(8)]
    cands = [cands[k] for k in rng.permutation(len(cands))]
    taken: list[Region] = list(regions)
    marks = []
    for color in colors:
        if color not in PEN_RGB:
            raise ValueError(f"unknown pen colour {color!r}; use one of {sorted(PEN_RGB)}")
        free = [(x, y) for x, y in cands
                if not any(r.intersects(x - gap, y - gap, x + bw + gap, y + bh + gap) for r in taken)]
        if not free:
            raise ValueError(f"no room for a {color} pen mark outside the tissue regions; use a larger slide")
        x, y = free[0]
        t = np.linspace(0, 1, 48)
        px = x + thick + t * (bw - 2 * thick)
        py = y + bh / 2 + (bh / 2 - thick) * np.sin(2 * np.pi * (1.5 * t + rng.uniform()))
        pts = tuple((float(a), float(b)) for a, b in zip(px, py, strict=True))
        box = Region("rectangle", float(px.min() - thick), float(py.min() - thick),
                     float(px.max() + thick), float(py.max() + thick))
        taken.append(box)
        marks.append(PenMark(color, pts, thick, box))
    return tuple(marks)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Unit-variance Gaussian-blurred noise (sigma_x, sigma_y in px); wide blurs run on a coarser grid."""
    f = max(1, int(min(sigma) // 2))
    n = cv2.GaussianBlur(rng.standard_normal((size // f, size // f), np.float32), (0, 0), sigma[0] / f,
                         sigmaY=sigma[1] / f, borderType=cv2.BORDER_REFLECT)
    if f > 1:
        n = cv2.resize(n, (size, size), interpolation=cv2.INTER_LINEAR)
    return n / max(float(n.std()), 1e-6)


def _render_atlas(s: int, um_per_px: float, stain: str, density: float, seed: int) -> tuple[np.ndarray, ...]:
    """(tissue, background) RGB textures of s x s px at ``um_per_px``."""
    rng = np.random.default_rng([seed, int(um_per_px * 1000)])
    low = _smooth_noise(rng, s, (30 / um_per_px + 1, 30 / um_per_px + 1))
    fib = _smooth_noise(rng, s, (max(0.7, 4 / um_per_px), max(0.5, 1.5 / um_per_px)))
    # Nuclear coverage: anti-aliased ellipses while nuclei are >= ~1 px in radius, else a mottled field.
    if um_per_px <= 2.5:
        alpha = np.zeros((s, s), np.float32)
        n = int(rng.poisson(density * NUCLEI_PER_UM2 * (s * um_per_px) ** 2))
        centres = rng.uniform(0, s, (n, 2))
        k = n // 3  # a third of the nuclei cluster, as in glands / infiltrates
        hubs = rng.uniform(0, s, (max(1, k // 25), 2))
        centres[:k] = hubs[rng.integers(0, len(hubs), k)] + rng.normal(0, 12 / um_per_px, (k, 2))
        params = (centres.tolist(), (rng.uniform(2.5, 4.5, n) / um_per_px).tolist(),
                  rng.uniform(0.55, 1, n).tolist(), rng.uniform(0, 180, n).tolist(), rng.uniform(0.75, 1, n).tolist())
        for (cx, cy), r, asp, ang, a in zip(*params, strict=True):
            axes = (max(1, int(r * 16)), max(1, int(r * asp * 16)))
            cv2.ellipse(alpha, (int(cx * 16), int(cy * 16)), axes, ang, 0, 360, a, -1, cv2.LINE_AA, 4)
    else:
        cover = min(0.9, density * NUCLEI_PER_UM2 * np.pi * 3.5**2 * 0.8)
        alpha = np.clip(cover * (1 + 0.35 * _smooth_noise(rng, s, (1.0, 1.0))), 0, 1).astype(np.float32)
    # Composite channel by channel on single-channel float32 planes: ~10x faster than (s, s, 3) temporaries.
    stroma_mod = 1 + 0.03 * (low + fib)
    nuc_mod = 1 + 0.08 * _smooth_noise(rng, s, (1.5, 1.5))
    grain = rng.standard_normal((s, s), np.float32)
    ws, wn = stroma_mod * (1 - alpha), nuc_mod * alpha
    tissue = cv2.merge([ws * c_s + wn * c_n + 3 * grain for c_s, c_n in zip(*STAINS[stain], strict=True)])
    bg = cv2.merge([c + 0.8 * low + 1.5 * grain for c in BACKGROUND_RGB])
    return cv2.convertScaleAbs(tissue), cv2.convertScaleAbs(bg)  # rounds and saturates to uint8


class _Painter:
    """Renders any block of any level from the geometry; caches atlases and pre-encoded uniform tiles."""

    def __init__(self, spec: SyntheticSpec, encode: Callable[[np.ndarray], bytes]) -> None:
        self.s, self.encode = spec, encode
        self.atlases: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self.pool: dict[tuple[float, int, int], bytes] = {}

    def atlas(self, ds: float) -> tuple[np.ndarray, np.ndarray]:
        if ds not in self.atlases:
            um = (self.s.mpp or 0.25) * ds
            # small levels get a smaller atlas: rendering cost matters for the many tiny test slides
            side = ATLAS if max(self.s.width, self.s.height) / ds > ATLAS // 2 else ATLAS // 2
            self.atlases[ds] = _render_atlas(side, um, self.s.stain, self.s.nuclei_density, self.s.seed)
        return self.atlases[ds]

    def _crop(self, img: np.ndarray, key: int, tw: int, th: int) -> np.ndarray:
        """A crop of the atlas at a hashed offset and one of 8 flips/rotations (square tiles only)."""
        ox, oy = key % (img.shape[1] - tw + 1), (key >> 20) % (img.shape[0] - th + 1)
        c = img[oy:oy + th, ox:ox + tw]
        if tw == th:
            c = np.rot90(c, (key >> 40) % 4)
            c = c[:, ::-1] if (key >> 44) & 1 else c
        return c

    def block(self, ds: float, px0: int, py0: int, tw: int, th: int, key: int) -> np.ndarray:
        """RGB pixels of level pixels [px0, px0+tw) x [py0, py0+th) at downsample ``ds``."""
        s = self.s
        xs, ys = (px0 + np.arange(tw) + 0.5) * ds, (py0 + np.arange(th) + 0.5) * ds
        tissue, bg = self.atlas(ds)
        mask = _union(s.regions, xs, ys)[..., None]
        out = np.where(mask, self._crop(tissue, key, tw, th), self._crop(bg, key >> 3, tw, th))
        out = np.ascontiguousarray(out)
        for pen in s.pen_marks:
            b = pen.box
            if b.intersects(xs[0] - 2 * ds, ys[0] - 2 * ds, xs[-1] + 2 * ds, ys[-1] + 2 * ds):
                pts = np.array(pen.points) / ds - 0.5 - (px0, py0)
                cv2.polylines(out, [np.round(pts * 16).astype(np.int32)], False, PEN_RGB[pen.color],
                              max(1, round(pen.thickness / ds)), cv2.LINE_AA, 4)
        if s.border_width:
            bw = s.border_width
            out[(ys < bw) | (ys >= s.height - bw)] = 0
            out[:, (xs < bw) | (xs >= s.width - bw)] = 0
        return out

    def _kind(self, ds: float, px0: int, py0: int, t: int) -> int:
        """0 = all background, 1 = all tissue (both poolable), 2 = needs its own rendering."""
        s = self.s
        x0, y0, x1, y1 = px0 * ds, py0 * ds, (px0 + t) * ds, (py0 + t) * ds
        m = 2 * ds
        if any(p.box.intersects(x0 - m, y0 - m, x1 + m, y1 + m) for p in s.pen_marks):
            return 2
        bw = s.border_width
        if bw and (x0 < bw or y0 < bw or x1 > s.width - bw or y1 > s.height - bw):
            return 2
        hit = [r for r in s.regions if r.intersects(x0, y0, x1, y1)]
        if not hit:
            return 0
        xs, ys = (px0 + np.arange(t) + 0.5) * ds, (py0 + np.arange(t) + 0.5) * ds
        mask = _union(hit, xs, ys)
        return 1 if mask.all() else 0 if not mask.any() else 2

    def tiles(self, level: int) -> Iterator[bytes]:
        """Encoded tiles of one level, row-major, as tifffile expects."""
        s, t = self.s, self.s.tile_size
        ds = s.level_downsamples[level]
        lw, lh = s.level_dimensions[level]
        for ty in range(math.ceil(lh / t)):
            for tx in range(math.ceil(lw / t)):
                kind = self._kind(ds, tx * t, ty * t, t)
                h = _mix(s.seed, level, tx, ty)
                if kind == 2:
                    yield self.encode(self.block(ds, tx * t, ty * t, t, t, h))
                    continue
                v = h % (POOL_TISSUE if kind else POOL_BG)
                if (ds, kind, v) not in self.pool:
                    tissue, bg = self.atlas(ds)
                    tile = self._crop(tissue if kind else bg, _mix(s.seed, level, kind, v), t, t)
                    self.pool[(ds, kind, v)] = self.encode(np.ascontiguousarray(tile))
                yield self.pool[(ds, kind, v)]

    def thumbnail(self, max_side: int) -> np.ndarray:
        ds = max(self.s.width, self.s.height) / max_side
        w, h = math.ceil(self.s.width / ds), math.ceil(self.s.height / ds)
        return self.block(ds, 0, 0, w, h, _mix(self.s.seed, 99))

    def full(self) -> np.ndarray:
        """Level 0 as one array (flat format only: modest sizes)."""
        s, t = self.s, self.s.tile_size
        out = np.empty((s.height, s.width, 3), np.uint8)
        for y in range(0, s.height, t):
            for x in range(0, s.width, t):
                tile = self.block(1.0, x, y, t, t, _mix(s.seed, 0, x, y))
                out[y:y + t, x:x + t] = tile[: s.height - y, : s.width - x]
        return out


def _levels(width: int, height: int, tile_size: int) -> tuple[float, ...]:
    """Downsamples 1, 4, 16, ... until the smallest level fits in about two tiles (Aperio-like)."""
    ds = [1.0]
    while max(width, height) / ds[-1] > 2 * tile_size:
        ds.append(ds[-1] * 4)
    return tuple(ds)


def _encoder(compression: str, quality: int, rgb_jpeg: bool) -> tuple[Callable[[np.ndarray], bytes], dict]:
    """Tile encoder plus the matching tifffile tag arguments (tiles are handed to tifffile pre-encoded)."""
    if compression == "jpeg":
        # Aperio stores JPEG tiles in RGB colour space without chroma subsampling (photometric RGB);
        # generic TIFFs use the usual YCbCr 4:2:0.
        out, sub = ("RGB", (1, 1)) if rgb_jpeg else ("YCBCR", (2, 2))

        def enc(a: np.ndarray) -> bytes:
            return imagecodecs.jpeg_encode(a, level=quality, colorspace="RGB", outcolorspace=out,
                                           subsampling=sub)

        return enc, {"compression": "jpeg", "subsampling": sub, "compressionargs": {"outcolorspace": out}}
    if compression in ("zlib", "deflate"):
        return (lambda a: imagecodecs.zlib_encode(a.tobytes(), level=6)), {"compression": "zlib"}
    if compression == "lzw":
        return (lambda a: imagecodecs.lzw_encode(a.tobytes())), {"compression": "lzw"}
    if compression == "none":
        return (lambda a: a.tobytes()), {"compression": None}
    raise ValueError(f"unknown compression {compression!r}; use jpeg, zlib, lzw or none")


def _label_image(seed: int, text: str) -> np.ndarray:
    """A white slide label with a barcode and the slide name."""
    rng = np.random.default_rng([seed, 5])
    img = np.full((400, 400, 3), 250, np.uint8)
    x = 40
    while x < 360:
        w = int(rng.integers(2, 7))
        img[40:200, x:x + w] = 10
        x += w + int(rng.integers(2, 6))
    cv2.putText(img, "SYNTHETIC", (40, 260), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (10, 10, 10), 3, cv2.LINE_AA)
    cv2.putText(img, text[:16], (40, 330), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (10, 10, 10), 2, cv2.LINE_AA)
    return img


def _macro_image(label: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """Photo of the whole glass slide: label on the left, tissue area on the right (1280 x 432)."""
    img = np.full((432, 1280, 3), 208, np.uint8)
    img[16:416, 16:416] = cv2.resize(label, (400, 400), interpolation=cv2.INTER_AREA)
    h, w = thumb.shape[:2]
    f = min(400 / h, 820 / w)
    th = cv2.resize(thumb, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    y, x = (432 - th.shape[0]) // 2, 440 + (820 - th.shape[1]) // 2
    img[y:y + th.shape[0], x:x + th.shape[1]] = th
    return img


def _write_svs(spec: SyntheticSpec, painter: _Painter, tags: dict, big: bool) -> None:
    w, h, t, q = spec.width, spec.height, spec.tile_size, spec.jpeg_quality
    mpp = spec.mpp
    mag = 40 if mpp is None or mpp <= 0.3 else 20 if mpp <= 0.6 else 10
    head = f"{APERIO_HEAD}\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t})"
    meta = (f"|AppMag = {mag}|StripeWidth = 2040|ScanScope ID = SYNTH|Filename = {spec.path.stem}"
            "|Date = 01/01/25|Time = 00:00:00" + (f"|MPP = {mpp:.4f}" if mpp else "")
            + f"|SyntheticSeed = {spec.seed}")
    jpeg = {"photometric": "rgb", "metadata": None, **tags}
    label = _label_image(spec.seed, spec.path.stem)
    with tifffile.TiffWriter(spec.path, bigtiff=big) as tw:
        for i, (lw, lh) in enumerate(spec.level_dimensions):
            desc = f"{head} JPEG/RGB Q={q}{meta}" if i == 0 else f"{head} -> {lw}x{lh} JPEG/RGB Q={q}"
            tw.write(painter.tiles(i), shape=(lh, lw, 3), dtype=np.uint8, tile=(t, t), description=desc,
                     **jpeg)
            if i == 0:  # Aperio puts the stripped thumbnail right after level 0
                thumb = painter.thumbnail(min(768, max(w, h) // 4))
                size = f"{thumb.shape[1]}x{thumb.shape[0]}"
                tw.write(thumb, rowsperstrip=16, description=f"{APERIO_HEAD}\n{w}x{h} -> {size} - {meta}", **jpeg)
        tw.write(label, photometric="rgb", compression="lzw", predictor=True, rowsperstrip=16, subfiletype=1,
                 description=f"{APERIO_HEAD}\nlabel {label.shape[1]}x{label.shape[0]}", metadata=None)
        macro = _macro_image(label, thumb)
        tw.write(macro, rowsperstrip=16, subfiletype=9,
                 description=f"{APERIO_HEAD}\nmacro {macro.shape[1]}x{macro.shape[0]}", **jpeg)


def _resolution(mpp: float | None, ds: float) -> dict:
    """Resolution tags in pixels per centimetre (OpenSlide derives openslide.mpp-x from these)."""
    if mpp is None:
        return {}
    return {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}


def _write_pyramid(spec: SyntheticSpec, painter: _Painter, tags: dict, big: bool, ome: bool) -> None:
    t, n = spec.tile_size, len(spec.level_downsamples)
    kw = {"photometric": "rgb", "tile": (t, t), "dtype": np.uint8, **tags}
    with tifffile.TiffWriter(spec.path, bigtiff=big, ome=ome) as tw:
        for i, ((lw, lh), ds) in enumerate(zip(spec.level_dimensions, spec.level_downsamples, strict=True)):
            if ome and i == 0:
                md: dict = {"axes": "YXS", "Name": spec.path.stem}
                if spec.mpp:
                    md.update(PhysicalSizeX=spec.mpp, PhysicalSizeXUnit="µm",
                              PhysicalSizeY=spec.mpp, PhysicalSizeYUnit="µm")
                extra: dict = {"subifds": n - 1, "metadata": md}
            elif ome:
                extra = {"subfiletype": 1, "metadata": None}
            else:
                extra = {"subfiletype": int(i > 0), "metadata": None,
                         "description": f"wsi_pipeline synthetic slide seed={spec.seed}" if i == 0 else None}
            tw.write(painter.tiles(i), shape=(lh, lw, 3), **kw, **extra, **_resolution(spec.mpp, ds))


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int = 8192,
    height: int = 6144,
    mpp: float | None = 0.25,
    fmt: str = "svs",
    regions: Sequence[Region] | None = None,
    tile_size: int = 256,
    compression: str = "jpeg",
    jpeg_quality: int = 80,
    seed: int = 0,
    stain: str = "he",
    nuclei_density: float = 1.0,
    pen_marks: Sequence[str] = (),
    black_border: bool = False,
    level_downsamples: Sequence[float] | None = None,
) -> SyntheticSpec:
    """Write a synthetic slide and return its spec (geometry, levels, pen marks) for assertions.

    ``regions=None`` uses :func:`default_regions`; ``regions=()`` writes a blank slide."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown slide format {fmt!r}; use one of {FORMATS}")
    if stain not in STAINS:
        raise ValueError(f"unknown stain preset {stain!r}; use one of {sorted(STAINS)}")
    if tile_size % 16 or not 16 <= tile_size <= 512:
        raise ValueError(f"tile_size={tile_size} must be a multiple of 16 between 16 and 512")
    if fmt == "svs" and compression != "jpeg":
        raise ValueError("Aperio SVS slides are written with JPEG tiles; use compression='jpeg'")
    if fmt == "flat" and width * height > 100_000_000:
        raise ValueError(f"flat slides are held in memory; {width}x{height} is too large (max 1e8 px)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    regs = default_regions(width, height, seed) if regions is None else tuple(regions)
    pens = _place_pens(pen_marks, width, height, regs, seed)
    ds = tuple(float(d) for d in level_downsamples) if level_downsamples else _levels(width, height, tile_size)
    ds = (1.0,) if fmt == "flat" else ds
    if ds[0] != 1.0 or any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"level_downsamples={ds} must start at 1 and increase")
    spec = SyntheticSpec(
        path=path, width=width, height=height, mpp=mpp, fmt=fmt, regions=regs, tile_size=tile_size,
        level_downsamples=ds,
        seed=seed, stain=stain, nuclei_density=nuclei_density, pen_marks=pens,
        border_width=max(1, round(0.015 * min(width, height))) if black_border else 0,
        compression=compression, jpeg_quality=jpeg_quality,
        associated=("label", "macro", "thumbnail") if fmt == "svs" else (),
    )
    encode, tags = _encoder(compression, jpeg_quality, rgb_jpeg=fmt == "svs")
    painter = _Painter(spec, encode)
    big = width * height * 3 > 2**31  # raw size over 2 GiB: classic TIFF offsets could overflow
    if fmt == "svs":
        _write_svs(spec, painter, tags, big)
    elif fmt in ("tiff", "ome"):
        _write_pyramid(spec, painter, tags, big, ome=fmt == "ome")
    else:
        tags = {k: v for k, v in tags.items() if k != "compressionargs"}
        if compression == "jpeg":
            tags["compressionargs"] = {"level": jpeg_quality}
        tifffile.imwrite(path, painter.full(), photometric="rgb", rowsperstrip=64, metadata=None,
                         description=f"wsi_pipeline synthetic flat slide seed={seed}", **tags,
                         **_resolution(mpp, 1.0))
    return spec


def write_demo_cohort(
    out_dir: str | Path, n_slides: int = 12, seed: int = 0, *, width: int = 4096, height: int = 3072,
    mpp: float = 0.5,
):
    """Small SVS slides in two visibly different classes with survival data; returns the sample sheet.

    Class 1 (high risk) has darker hematoxylin and ~3x the nuclei density, and shorter survival (exponential,
    median ~3 months vs ~42), with uniform censoring. Patients have 1-2 slides sharing label and outcome.
    The sheet (slide_id, path, patient_id, label, time, event) is also written to ``out_dir/samples.csv``."""
    import pandas as pd

    out = Path(out_dir)
    rng = np.random.default_rng([seed, 2024])
    rows: list[dict] = []
    patient = 0
    while len(rows) < n_slides:
        label = patient % 2
        n = min(n_slides - len(rows), 1 + int(rng.uniform() < 0.4))
        t_death = rng.exponential(4.0 if label else 60.0)
        t_censor = rng.uniform(6.0, 72.0)
        time, event = round(max(0.5, min(t_death, t_censor)), 1), int(t_death <= t_censor)
        for _ in range(n):
            sid = f"demo_{len(rows):03d}"
            spec = write_synthetic_slide(
                out / f"{sid}.svs", width=width, height=height, mpp=mpp, seed=_mix(seed, len(rows)) % 2**31,
                stain="he_dark" if label else "he", nuclei_density=2.0 if label else 0.6, jpeg_quality=60,
            )
            rows.append({"slide_id": sid, "path": str(spec.path.resolve()), "patient_id": f"P{patient:03d}",
                         "label": label, "time": time, "event": event})
        patient += 1
    sheet = pd.DataFrame(rows, columns=["slide_id", "path", "patient_id", "label", "time", "event"])
    sheet.to_csv(out / "samples.csv", index=False)
    return sheet
