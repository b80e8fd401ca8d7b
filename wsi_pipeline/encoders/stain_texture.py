"""`stain-texture`: a deterministic, weight-free CPU encoder of handcrafted colour and texture features.

50 features per tile (names in FEATURE_NAMES): hematoxylin/eosin/DAB optical-density statistics from colour
deconvolution (`skimage.color.rgb2hed`'s formula via a lookup table), RGB colour moments, saturation/brightness,
tissue and nuclei-like pixel fractions, grey-level co-occurrence (GLCM) properties and a uniform-LBP histogram.
Colour statistics and the GLCM are vectorised over the batch (the GLCM with one `bincount` per offset, matching
`skimage.feature.graycomatrix` + `graycoprops`); LBP uses skimage per tile on a 2x-downsampled grey image.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import hed_from_rgb
from skimage.feature import local_binary_pattern

from wsi_pipeline.encoders.base import TileEncoder
from wsi_pipeline.encoders.config import EncoderConfig

GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_POINTS, LBP_RADIUS = 8, 1
# Thresholds on rgb2hed optical density / [0, 1] intensity, read off H&E tiles of the CMU test slide.
NUCLEI_H_MIN, NUCLEI_GRAY_MAX = 0.06, 0.55
TISSUE_SAT_MIN, TISSUE_VALUE_MAX = 0.08, 0.92
CHUNK = 32
PCT_STRIDE = 4
GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])  # skimage.color.rgb2gray's luminance weights

FEATURE_NAMES: tuple[str, ...] = (
    *(f"{s}_{stat}" for s in ("hema", "eosin", "dab") for stat in ("mean", "std", "p10", "p50", "p90")),
    *(f"{c}_{m}" for c in ("red", "green", "blue") for m in ("mean", "std", "skew")),
    "saturation_mean",
    "value_mean",
    "tissue_fraction",
    "nuclei_fraction",
    *(f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS),
    *(f"lbp_{i}" for i in range(LBP_POINTS + 2)),
)


def gray_uint8(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint8 luminance (rgb2gray weights, rounded)."""
    return np.rint(rgb.astype(np.float32) @ GRAY_WEIGHTS.astype(np.float32)).clip(0, 255).astype(np.uint8)


def glcm_offsets(distance: int) -> list[tuple[int, int]]:
    # skimage's convention: row offset round(sin(angle) * d), column offset round(cos(angle) * d).
    return [(int(round(np.sin(a) * distance)), int(round(np.cos(a) * distance))) for a in GLCM_ANGLES]


def batched_glcm(q: np.ndarray, distance: int, levels: int = GLCM_LEVELS) -> np.ndarray:
    """Symmetric, normalised co-occurrence matrices (B, levels, levels, n_angles) of quantised images q (B, H, W)."""
    b, h, w = q.shape
    out = np.empty((b, levels, levels, len(GLCM_ANGLES)), dtype=np.float64)
    base = (np.arange(b, dtype=np.int64) * levels * levels)[:, None, None]
    for k, (dr, dc) in enumerate(glcm_offsets(distance)):
        r0, r1 = max(0, -dr), h - max(0, dr)
        c0, c1 = max(0, -dc), w - max(0, dc)
        i = q[:, r0:r1, c0:c1].astype(np.int64)
        j = q[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc].astype(np.int64)
        counts = np.bincount((base + i * levels + j).ravel(), minlength=b * levels * levels)
        m = counts.reshape(b, levels, levels).astype(np.float64)
        m = m + m.transpose(0, 2, 1)  # symmetric
        out[..., k] = m / np.maximum(m.sum(axis=(1, 2), keepdims=True), 1.0)
    return out


def glcm_props(p: np.ndarray) -> np.ndarray:
    """graycoprops' definitions, vectorised: p (B, L, L, A) -> (B, len(GLCM_PROPS)) averaged over angles."""
    levels = p.shape[1]
    i = np.arange(levels, dtype=np.float64)[None, :, None, None]
    j = np.arange(levels, dtype=np.float64)[None, None, :, None]
    diff2 = (i - j) ** 2
    contrast = (p * diff2).sum(axis=(1, 2))
    dissimilarity = (p * np.sqrt(diff2)).sum(axis=(1, 2))
    homogeneity = (p / (1.0 + diff2)).sum(axis=(1, 2))
    asm = (p**2).sum(axis=(1, 2))
    mu_i, mu_j = (p * i).sum(axis=(1, 2)), (p * j).sum(axis=(1, 2))
    var_i = (p * (i - mu_i[:, None, None, :]) ** 2).sum(axis=(1, 2))
    var_j = (p * (j - mu_j[:, None, None, :]) ** 2).sum(axis=(1, 2))
    cov = (p * (i - mu_i[:, None, None, :]) * (j - mu_j[:, None, None, :])).sum(axis=(1, 2))
    denom = np.sqrt(var_i * var_j)
    # As graycoprops: a constant image (zero variance) has correlation 1.
    correlation = np.where(denom < 1e-15, 1.0, cov / np.where(denom < 1e-15, 1.0, denom))
    props = np.stack([contrast, dissimilarity, homogeneity, np.sqrt(asm), correlation, asm], axis=1)
    return props.mean(axis=2)


def lbp_histogram(gray: np.ndarray) -> np.ndarray:
    """Normalised uniform-LBP histogram (P + 2 bins) of one grey image."""
    codes = local_binary_pattern(gray, LBP_POINTS, LBP_RADIUS, method="uniform")
    hist = np.bincount(codes.astype(np.int64).ravel(), minlength=LBP_POINTS + 2)
    return hist / max(codes.size, 1)


def _od_lut() -> np.ndarray:
    # rgb2hed's per-channel optical density, log(max(v / 255, 1e-6)) / log(1e-6), for all 256 uint8 values.
    v = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    return (np.log(v) / np.log(1e-6)).astype(np.float32)


_OD_LUT = _od_lut()
_HED_FROM_RGB = hed_from_rgb.astype(np.float32)


def hed_od(tiles: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hed for uint8 tiles via a 256-entry lookup table, in float32 (same formula)."""
    return np.maximum(_OD_LUT[tiles] @ _HED_FROM_RGB, 0.0)


def _channel_moments(tiles: np.ndarray) -> np.ndarray:
    """Mean, std, skewness of each RGB channel in [0, 1], from per-tile histograms (one bincount pass)."""
    b = tiles.shape[0]
    idx = (np.arange(b * 3, dtype=np.int64).reshape(b, 1, 1, 3) * 256) + tiles
    hist = np.bincount(idx.ravel(), minlength=b * 3 * 256).reshape(b, 3, 256).astype(np.float64)
    p = hist / hist.sum(axis=2, keepdims=True)
    v = np.arange(256, dtype=np.float64) / 255.0
    mean = p @ v
    d = v[None, None, :] - mean[..., None]
    var = (p * d**2).sum(axis=2)
    std = np.sqrt(var)
    skew = (p * d**3).sum(axis=2) / np.maximum(std, 1e-6) ** 3
    return np.stack([mean, std, skew], axis=2).reshape(b, 9)  # per channel: mean, std, skew


def stain_texture_features(tiles: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 50) float32 features, deterministic."""
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"expected (B, H, W, 3) uint8 tiles, got {tiles.shape} {tiles.dtype}")
    b = tiles.shape[0]
    if b == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    planes = [np.ascontiguousarray(tiles[..., c]).reshape(b, -1) for c in range(3)]  # (B, H*W) each
    od = [_OD_LUT[p] for p in planes]
    # (B, 3, H*W) channel-first optical densities (rgb2hed's matrix product written out per stain).
    hed = np.stack([np.maximum(od[0] * m[0] + od[1] * m[1] + od[2] * m[2], 0.0) for m in _HED_FROM_RGB.T], axis=1)
    # Percentiles from every 4th pixel: a fixed lattice, 4x cheaper than sorting all pixels, same to ~1e-3.
    pct = np.percentile(hed[:, :, ::PCT_STRIDE], [10, 50, 90], axis=2)  # (3, B, 3)
    stain = np.stack([hed.mean(axis=2), hed.std(axis=2), pct[0], pct[1], pct[2]], axis=2).reshape(b, 15)

    moments = _channel_moments(tiles)

    vmax = np.maximum(np.maximum(planes[0], planes[1]), planes[2])
    vmin = np.minimum(np.minimum(planes[0], planes[1]), planes[2])
    sat = (vmax - vmin).astype(np.float32) / np.maximum(vmax, 1).astype(np.float32)
    gray_flat = (
        np.rint(
            planes[0] * np.float32(GRAY_WEIGHTS[0])
            + planes[1] * np.float32(GRAY_WEIGHTS[1])
            + planes[2] * np.float32(GRAY_WEIGHTS[2])
        )
        .clip(0, 255)
        .astype(np.uint8)
    )
    tissue = (sat > TISSUE_SAT_MIN) & (vmax < TISSUE_VALUE_MAX * 255)
    nuclei = (hed[:, 0] > NUCLEI_H_MIN) & (gray_flat < NUCLEI_GRAY_MAX * 255)
    n = gray_flat.shape[1]
    colour = np.stack(
        [
            sat.mean(axis=1),
            vmax.mean(axis=1) / 255.0,
            np.count_nonzero(tissue, axis=1) / n,
            np.count_nonzero(nuclei, axis=1) / n,
        ],
        axis=1,
    )
    gray = gray_flat.reshape(tiles.shape[:3])

    q = (gray // (256 // GLCM_LEVELS)).astype(np.uint8)
    glcm = np.concatenate([glcm_props(batched_glcm(q, d)) for d in GLCM_DISTANCES], axis=1)

    h2, w2 = gray.shape[1] // 2 * 2, gray.shape[2] // 2 * 2
    small = gray[:, :h2, :w2].reshape(b, h2 // 2, 2, w2 // 2, 2).mean(axis=(2, 4), dtype=np.float32)
    lbp = np.stack([lbp_histogram(np.rint(s).astype(np.uint8)) for s in small])

    feats = np.concatenate([stain, moments, colour, glcm, lbp], axis=1).astype(np.float32)
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)


class StainTextureEncoder(TileEncoder):
    """Handcrafted features on CPU; no weights, no preprocessing (works at the tile's own resolution)."""

    feature_names = FEATURE_NAMES

    def __init__(self, cfg: EncoderConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.name = cfg.name
        self.embed_dim = len(FEATURE_NAMES)
        self.preprocessing = None
        self.device = torch.device(device)

    @torch.inference_mode()
    def encode_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
        arr = tiles.detach().cpu().numpy()
        # Chunks bound the float64 temporaries of rgb2hed (~24 bytes per pixel).
        feats = [stain_texture_features(arr[i : i + CHUNK]) for i in range(0, len(arr), CHUNK)] or [
            stain_texture_features(arr)
        ]
        return torch.from_numpy(np.concatenate(feats)).to(self.device)

    def _provenance_core(self) -> dict:
        return {
            "feature_names": list(FEATURE_NAMES),
            "params": {
                "glcm_levels": GLCM_LEVELS,
                "glcm_distances": list(GLCM_DISTANCES),
                "lbp": {"points": LBP_POINTS, "radius": LBP_RADIUS, "method": "uniform", "downsample": 2},
                "nuclei": {"hema_min": NUCLEI_H_MIN, "gray_max": NUCLEI_GRAY_MAX},
                "tissue": {"saturation_min": TISSUE_SAT_MIN, "value_max": TISSUE_VALUE_MAX},
            },
        }


def build_stain_texture(cfg: EncoderConfig, device: torch.device | str = "cpu") -> StainTextureEncoder:
    return StainTextureEncoder(cfg, device)
