"""stain-texture on real tiles of the CMU slide, cross-checked against skimage/scipy computed directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from scipy import stats
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

from wsi_pipeline.encoders import EncoderConfig, build_encoder
from wsi_pipeline.encoders.stain_texture import (
    FEATURE_NAMES,
    GLCM_ANGLES,
    GLCM_DISTANCES,
    GLCM_LEVELS,
    GLCM_PROPS,
    PCT_STRIDE,
    stain_texture_features,
)

# Found on the slide: a nuclei-dense H&E region and empty glass.
HE_XY, PALE_XY = (1280, 1024), (0, 512)


def _read(slide: Path, xy: tuple[int, int], size: int) -> np.ndarray:
    with openslide.OpenSlide(str(slide)) as s:
        return np.array(s.read_region(xy, 0, (size, size)).convert("RGB"))


@pytest.fixture(scope="module")
def tiles(cmu_slide: Path) -> dict[str, np.ndarray]:
    return {
        "he": _read(cmu_slide, HE_XY, 256),
        "pale": _read(cmu_slide, PALE_XY, 256),
        "mixed": _read(cmu_slide, (1536, 1280), 256),
    }


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(EncoderConfig(name="stain-texture"))


def _feat(f: np.ndarray, name: str) -> float:
    return float(f[FEATURE_NAMES.index(name)])


def test_fixed_dimension_finite_and_deterministic(encoder, tiles) -> None:
    batch = torch.from_numpy(np.stack([tiles["he"], tiles["pale"], tiles["mixed"]]))
    a, b = encoder.encode_uint8(batch), encoder.encode_uint8(batch)
    assert encoder.embed_dim == len(FEATURE_NAMES) == 50 and a.shape == (3, 50) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # A tile's features do not depend on its batch-mates or its position in the batch.
    alone = encoder.encode_uint8(batch[2:3])
    torch.testing.assert_close(alone[0], a[2], rtol=1e-6, atol=1e-7)
    assert encoder.preprocessing is None
    assert encoder.provenance()["feature_names"] == list(FEATURE_NAMES)


def test_separates_he_from_pale(tiles) -> None:
    he, pale = stain_texture_features(np.stack([tiles["he"], tiles["pale"]]))
    assert _feat(he, "hema_mean") > 5 * _feat(pale, "hema_mean")
    assert _feat(he, "nuclei_fraction") > 0.3 > 0.01 > _feat(pale, "nuclei_fraction")
    assert _feat(he, "tissue_fraction") > 0.8 and _feat(pale, "tissue_fraction") < 0.05
    assert _feat(he, "glcm_contrast_d1") > 10 * _feat(pale, "glcm_contrast_d1")
    assert _feat(he, "value_mean") < _feat(pale, "value_mean")


def test_stain_statistics_match_skimage_rgb2hed(tiles) -> None:
    for tile in tiles.values():
        f = stain_texture_features(tile[None])[0]
        hed = rgb2hed(tile)
        for k, stain in enumerate(("hema", "eosin", "dab")):
            ch = hed[..., k].ravel()
            assert _feat(f, f"{stain}_mean") == pytest.approx(ch.mean(), abs=1e-6)
            assert _feat(f, f"{stain}_std") == pytest.approx(ch.std(), abs=1e-6)
            for q in (10, 50, 90):  # from the documented every-4th-pixel lattice
                assert _feat(f, f"{stain}_p{q}") == pytest.approx(np.percentile(ch[::PCT_STRIDE], q), abs=1e-6)
        # and the lattice percentile is close to the all-pixel one
        assert _feat(f, "hema_p50") == pytest.approx(np.percentile(hed[..., 0], 50), abs=2e-3)


def test_colour_moments_match_scipy(tiles) -> None:
    tile = tiles["mixed"]
    f = stain_texture_features(tile[None])[0]
    for k, ch in enumerate(("red", "green", "blue")):
        v = tile[..., k].ravel() / 255.0
        assert _feat(f, f"{ch}_mean") == pytest.approx(v.mean(), abs=1e-6)
        assert _feat(f, f"{ch}_std") == pytest.approx(v.std(), abs=1e-6)
        assert _feat(f, f"{ch}_skew") == pytest.approx(stats.skew(v), rel=1e-4, abs=1e-5)


def test_glcm_matches_skimage_graycoprops(tiles) -> None:
    batch = np.stack(list(tiles.values()))
    feats = stain_texture_features(batch)
    for tile, f in zip(batch, feats, strict=True):
        gray = np.rint(tile.astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))
        q = (gray.clip(0, 255).astype(np.uint8) // (256 // GLCM_LEVELS)).astype(np.uint8)
        glcm = graycomatrix(q, list(GLCM_DISTANCES), list(GLCM_ANGLES), levels=GLCM_LEVELS, symmetric=True, normed=True)
        for di, d in enumerate(GLCM_DISTANCES):
            for prop in GLCM_PROPS:
                expected = graycoprops(glcm, prop)[di].mean()
                assert _feat(f, f"glcm_{prop}_d{d}") == pytest.approx(expected, rel=1e-5, abs=1e-6), (prop, d)


def test_lbp_histogram_matches_skimage(tiles) -> None:
    tile = tiles["he"]
    f = stain_texture_features(tile[None])[0]
    gray = np.rint(tile.astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))
    gray = gray.clip(0, 255).astype(np.uint8)
    small = np.rint(gray.reshape(128, 2, 128, 2).mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)
    codes = local_binary_pattern(small, 8, 1, method="uniform").astype(int)
    expected = np.bincount(codes.ravel(), minlength=10) / codes.size
    got = np.array([_feat(f, f"lbp_{i}") for i in range(10)])
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert got.sum() == pytest.approx(1.0)


def test_other_tile_sizes_and_flat_tiles(cmu_slide: Path, encoder) -> None:
    for size in (224, 512):
        emb = encoder.encode_uint8(torch.from_numpy(_read(cmu_slide, HE_XY, size)[None]))
        assert emb.shape == (1, 50) and torch.isfinite(emb).all()
    flat = torch.full((2, 64, 64, 3), 255, dtype=torch.uint8)
    flat[1] = 0
    emb = encoder.encode_uint8(flat)
    assert torch.isfinite(emb).all()
    assert emb[0, FEATURE_NAMES.index("glcm_correlation_d1")] == 1.0  # graycoprops' value for a constant image
    with pytest.raises(ValueError):
        stain_texture_features(np.zeros((2, 8, 8), dtype=np.uint8))
