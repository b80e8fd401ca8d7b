"""Figures: attention heatmap geometry, ROC and Kaplan-Meier PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.mil.plots import attention_heatmap, plot_km, plot_roc


def test_attention_heatmap_places_scores_on_tiles():
    thumb = np.full((100, 200, 3), 200, np.uint8)
    scale = 0.1  # thumbnail px per level-0 px: level 0 is 2000 x 1000
    coords = np.array([[0, 0], [500, 0], [1000, 500]])  # level-0 top-left corners, tile size 500
    scores = np.array([0.1, 0.2, 0.9])
    out = attention_heatmap(thumb, coords, 500, scores, scale, alpha=1.0)
    assert out.shape == thumb.shape and out.dtype == np.uint8
    # pixels without a tile keep the thumbnail
    assert (out[60:, :100] == 200).all() and (out[:50, 150:] == 200).all()
    hottest, coldest = out[75, 125].astype(int), out[25, 25].astype(int)  # jet: high = red, low = blue
    assert hottest[0] > hottest[2] and coldest[2] > coldest[0]
    assert (out[50:100, 100:150] == out[75, 125]).all()  # the whole tile, exactly its footprint
    with pytest.raises(ValueError, match="coords but"):
        attention_heatmap(thumb, coords, 500, scores[:2], scale)


def test_roc_and_km_png(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.clip(y * 0.4 + rng.random(50) * 0.6, 0, 1)
    plot_roc(y, np.stack([1 - p, p], 1), ["neg", "pos"], tmp_path / "roc.png")
    t = rng.exponential(10, 50)
    e = rng.integers(0, 2, 50)
    plot_km(t, e, rng.random(50) > 0.5, tmp_path / "km.png", 0.03)
    for name in ("roc.png", "km.png"):
        img = Image.open(tmp_path / name)
        assert img.size[0] > 300 and img.size[1] > 300
        assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
