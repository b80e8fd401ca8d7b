"""Pixels: stain presets, pre-rendered texture atlases and the tile painter.

Tiles are crops of a small texture atlas per level, masked by the scene geometry; uniform tissue or background
tiles come from a pool of pre-encoded variants, so only tiles crossing an edge, a pen mark or the border are
rendered and encoded one by one. Regions with a named texture (``textures.py``) get that texture's atlas; the
others share the stain preset's atlas drawn here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import cv2
import numpy as np

from .scene import PEN_RGB, SyntheticSpec, mix, union
from .textures import TEXTURES, render_texture, smooth_noise

ATLAS = 1024  # texture atlas side (px); tiles are crops of it
POOL_TISSUE, POOL_BG = 256, 16  # pre-encoded variants per level for uniform tissue / background tiles
BACKGROUND_RGB = (240.0, 238.0, 240.0)
NUCLEI_PER_UM2 = 30e-4  # at nuclei_density=1: one nucleus per ~330 um^2 of stroma


# Stain presets: RGB of eosin-stained stroma and of hematoxylin-stained nuclei.
STAINS = {
    "he": ((234, 164, 203), (92, 58, 148)),
    "he_light": ((242, 190, 218), (128, 96, 176)),
    "he_dark": ((214, 128, 178), (62, 36, 118)),
    # fluorescence: dim TRITC-like tissue signal and bright DAPI nuclei over a dark background
    "fluorescence": ((40, 14, 18), (24, 46, 190)),
}
# Background (glass) colour per stain preset; brightfield presets share BACKGROUND_RGB.
BACKGROUNDS = {"fluorescence": (6.0, 6.0, 10.0)}


def _render_atlas(s: int, um_per_px: float, stain: str, density: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, background) RGB textures of s x s px at ``um_per_px``."""
    rng = np.random.default_rng([seed, int(um_per_px * 1000)])
    low = smooth_noise(rng, s, (30 / um_per_px + 1, 30 / um_per_px + 1))
    fib = smooth_noise(rng, s, (max(0.7, 4 / um_per_px), max(0.5, 1.5 / um_per_px)))
    # Nuclear coverage: anti-aliased ellipses while nuclei are >= ~1 px in radius, else a mottled field.
    if um_per_px <= 2.5:
        alpha = np.zeros((s, s), np.float32)
        n = int(rng.poisson(density * NUCLEI_PER_UM2 * (s * um_per_px) ** 2))
        centres = rng.uniform(0, s, (n, 2))
        k = n // 3  # a third of the nuclei cluster, as in glands / infiltrates
        hubs = rng.uniform(0, s, (max(1, k // 25), 2))
        centres[:k] = hubs[rng.integers(0, len(hubs), k)] + rng.normal(0, 12 / um_per_px, (k, 2))
        params = (
            centres.tolist(),
            (rng.uniform(2.5, 4.5, n) / um_per_px).tolist(),
            rng.uniform(0.55, 1, n).tolist(),
            rng.uniform(0, 180, n).tolist(),
            rng.uniform(0.75, 1, n).tolist(),
        )
        for (cx, cy), r, asp, ang, a in zip(*params, strict=True):
            axes = (max(1, int(r * 16)), max(1, int(r * asp * 16)))
            cv2.ellipse(alpha, (int(cx * 16), int(cy * 16)), axes, ang, 0, 360, a, -1, cv2.LINE_AA, 4)
    else:
        cover = min(0.9, density * NUCLEI_PER_UM2 * np.pi * 3.5**2 * 0.8)
        alpha = np.clip(cover * (1 + 0.35 * smooth_noise(rng, s, (1.0, 1.0))), 0, 1).astype(np.float32)
    # Composite channel by channel on single-channel float32 planes: ~10x faster than (s, s, 3) temporaries.
    stroma_mod = 1 + 0.03 * (low + fib)
    nuc_mod = 1 + 0.08 * smooth_noise(rng, s, (1.5, 1.5))
    grain = rng.standard_normal((s, s), np.float32)
    ws, wn = stroma_mod * (1 - alpha), nuc_mod * alpha
    tissue = cv2.merge([ws * c_s + wn * c_n + 3 * grain for c_s, c_n in zip(*STAINS[stain], strict=True)])
    bg = cv2.merge([c + 0.8 * low + 1.5 * grain for c in BACKGROUNDS.get(stain, BACKGROUND_RGB)])
    return cv2.convertScaleAbs(tissue), cv2.convertScaleAbs(bg)  # rounds and saturates to uint8


class Painter:
    """Renders any block of any level from the geometry; caches atlases and pre-encoded uniform tiles."""

    def __init__(self, spec: SyntheticSpec, encode: Callable[[np.ndarray], bytes | bytearray]) -> None:
        self.s, self.encode = spec, encode
        self.atlases: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        self.textured: dict[tuple[float, str], np.ndarray] = {}
        self.pool: dict[tuple[float, int, int], bytes | bytearray] = {}
        self.textured_pool: dict[tuple[float, str, int], bytes | bytearray] = {}

    def _side(self, ds: float) -> int:
        # small levels get a smaller atlas: rendering cost matters for the many tiny test slides
        return ATLAS if max(self.s.width, self.s.height) / ds > ATLAS // 2 else ATLAS // 2

    def atlas(self, ds: float) -> tuple[np.ndarray, np.ndarray]:
        if ds not in self.atlases:
            um = (self.s.mpp or 0.25) * ds
            self.atlases[ds] = _render_atlas(self._side(ds), um, self.s.stain, self.s.nuclei_density, self.s.seed)
        return self.atlases[ds]

    def texture_atlas(self, ds: float, name: str) -> np.ndarray:
        """The atlas of a named texture at downsample ``ds`` (the stain preset's tissue atlas for TISSUE)."""
        if name not in TEXTURES:
            return self.atlas(ds)[0]
        if (ds, name) not in self.textured:
            um = (self.s.mpp or 0.25) * ds
            eosin, hema = STAINS[self.s.stain]
            self.textured[(ds, name)] = render_texture(
                name, self._side(ds), um, eosin, hema, self.s.nuclei_density, self.s.seed
            )
        return self.textured[(ds, name)]

    def _crop(self, img: np.ndarray, key: int, tw: int, th: int) -> np.ndarray:
        """A crop of the atlas at a hashed offset and one of 8 flips/rotations (square tiles only)."""
        ox, oy = key % (img.shape[1] - tw + 1), (key >> 20) % (img.shape[0] - th + 1)
        c = img[oy : oy + th, ox : ox + tw]
        if tw == th:
            c = np.rot90(c, (key >> 40) % 4)
            c = c[:, ::-1] if (key >> 44) & 1 else c
        return c

    def block(self, ds: float, px0: int, py0: int, tw: int, th: int, key: int) -> np.ndarray:
        """RGB pixels of level pixels [px0, px0+tw) x [py0, py0+th) at downsample ``ds``."""
        s = self.s
        xs, ys = (px0 + np.arange(tw) + 0.5) * ds, (py0 + np.arange(th) + 0.5) * ds
        tissue, bg = self.atlas(ds)
        if s.textures:  # region by region, each in its texture (a later region is drawn over an earlier one)
            out = np.array(self._crop(bg, key >> 3, tw, th))
            for region, name in zip(s.regions, s.textures, strict=True):
                m = union((region,), xs, ys)
                if m.any():
                    out[m] = self._crop(self.texture_atlas(ds, name), key, tw, th)[m]
        else:
            mask = union(s.regions, xs, ys)[..., None]
            out = np.where(mask, self._crop(tissue, key, tw, th), self._crop(bg, key >> 3, tw, th))
        out = np.ascontiguousarray(out)
        for pen in s.pen_marks:
            b = pen.box
            if b.intersects(xs[0] - 2 * ds, ys[0] - 2 * ds, xs[-1] + 2 * ds, ys[-1] + 2 * ds):
                pts = np.array(pen.points) / ds - 0.5 - (px0, py0)
                cv2.polylines(
                    out,
                    [np.round(pts * 16).astype(np.int32)],
                    False,
                    PEN_RGB[pen.color],
                    max(1, round(pen.thickness / ds)),
                    cv2.LINE_AA,
                    4,
                )
        if s.border_width:
            bw = s.border_width
            out[(ys < bw) | (ys >= s.height - bw)] = 0
            out[:, (xs < bw) | (xs >= s.width - bw)] = 0
        return out

    def _kind(self, ds: float, px0: int, py0: int, t: int) -> tuple[int, str]:
        """(0 = all background, 1 = all tissue of one texture (both poolable), 2 = needs its own rendering;
        the texture of a kind-1 tile)."""
        s = self.s
        x0, y0, x1, y1 = px0 * ds, py0 * ds, (px0 + t) * ds, (py0 + t) * ds
        m = 2 * ds
        if any(p.box.intersects(x0 - m, y0 - m, x1 + m, y1 + m) for p in s.pen_marks):
            return 2, ""
        bw = s.border_width
        if bw and (x0 < bw or y0 < bw or x1 > s.width - bw or y1 > s.height - bw):
            return 2, ""
        hit = [i for i, r in enumerate(s.regions) if r.intersects(x0, y0, x1, y1)]
        if not hit:
            return 0, ""
        xs, ys = (px0 + np.arange(t) + 0.5) * ds, (py0 + np.arange(t) + 0.5) * ds
        if s.textures:  # which region is on top at each pixel, then whether one texture covers the tile
            top = np.zeros((t, t), np.int64)
            for i in hit:
                top[s.regions[i].contains(xs, ys)] = i + 1
            names = np.unique(np.asarray(("",) + s.textures, dtype=object)[top].astype(str))
            if len(names) > 1:
                return 2, ""
            return (1, str(names[0])) if names[0] else (0, "")
        mask = union([s.regions[i] for i in hit], xs, ys)
        return (1, "") if mask.all() else (0, "") if not mask.any() else (2, "")

    def tiles(self, level: int) -> Iterator[bytes | bytearray]:
        """Encoded tiles of one level, row-major, as tifffile expects."""
        s, t = self.s, self.s.tile_size
        ds = s.level_downsamples[level]
        lw, lh = s.level_dimensions[level]
        for ty in range(math.ceil(lh / t)):
            for tx in range(math.ceil(lw / t)):
                kind, name = self._kind(ds, tx * t, ty * t, t)
                h = mix(s.seed, level, tx, ty)
                if kind == 2:
                    yield self.encode(self.block(ds, tx * t, ty * t, t, t, h))
                    continue
                v = h % (POOL_TISSUE if kind else POOL_BG)
                if name:  # a tile inside one named texture
                    if (ds, name, v) not in self.textured_pool:
                        key = mix(s.seed, level, kind, v, TEXTURES.index(name) + 1)
                        tile = self._crop(self.texture_atlas(ds, name), key, t, t)
                        self.textured_pool[(ds, name, v)] = self.encode(np.ascontiguousarray(tile))
                    yield self.textured_pool[(ds, name, v)]
                    continue
                if (ds, kind, v) not in self.pool:
                    tissue, bg = self.atlas(ds)
                    tile = self._crop(tissue if kind else bg, mix(s.seed, level, kind, v), t, t)
                    self.pool[(ds, kind, v)] = self.encode(np.ascontiguousarray(tile))
                yield self.pool[(ds, kind, v)]

    def thumbnail(self, max_side: int) -> np.ndarray:
        ds = max(self.s.width, self.s.height) / max_side
        w, h = math.ceil(self.s.width / ds), math.ceil(self.s.height / ds)
        return self.block(ds, 0, 0, w, h, mix(self.s.seed, 99))

    def full(self) -> np.ndarray:
        """Level 0 as one array (flat format only: modest sizes)."""
        s, t = self.s, self.s.tile_size
        out = np.empty((s.height, s.width, 3), np.uint8)
        for y in range(0, s.height, t):
            for x in range(0, s.width, t):
                tile = self.block(1.0, x, y, t, t, mix(s.seed, 0, x, y))
                out[y : y + t, x : x + t] = tile[: s.height - y, : s.width - x]
        return out
