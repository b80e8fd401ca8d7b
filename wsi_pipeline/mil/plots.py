"""Figures for stage 3: ROC curves, Kaplan-Meier curves of predicted risk groups, attention heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> None:
    """Binary: one ROC curve; more classes: one-vs-rest curve per class."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pairs = [(1, classes[1])] if len(classes) == 2 else list(enumerate(classes))
    for i, name in pairs:
        positive = (y_true == i).astype(int)
        if positive.min() == positive.max():
            continue  # undefined for this class
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probs[:, i]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_km(
    times: np.ndarray, events: np.ndarray, high: np.ndarray, path: str | Path, p_value: float, title: str = ""
) -> None:
    """Kaplan-Meier curves (lifelines) of the predicted high- and low-risk groups, log-rank p in the legend."""
    from lifelines import KaplanMeierFitter

    fig, ax = plt.subplots(figsize=(5, 4))
    for mask, name in ((~high, "low risk"), (high, "high risk")):
        if mask.any():
            km = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(times[mask], events[mask])
            km.plot_survival_function(ax=ax, ci_show=False)
    ax.set(
        xlabel="time",
        ylabel="survival probability",
        ylim=(0, 1.02),
        title=(title or "Kaplan-Meier") + f"  log-rank p = {p_value:.3g}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_heatmap(
    thumbnail_rgb: np.ndarray,
    coords: np.ndarray,
    tile_size_level0: float,
    scores: np.ndarray,
    level0_scale: float,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Overlay per-tile scores on a slide thumbnail; returns an RGB uint8 image of the thumbnail's size.

    `coords` are the tiles' level-0 top-left corners (x, y); `level0_scale` is thumbnail pixels per level-0 pixel
    (e.g. thumb_width / level0_width). Scores are rank-normalised to [0, 1] (attention is heavy-tailed, min-max
    would light up one tile only); overlapping tiles average; pixels without a tile keep the thumbnail.
    """
    thumb = np.asarray(thumbnail_rgb)
    if thumb.ndim != 3 or thumb.shape[2] < 3:
        raise ValueError(f"thumbnail must be H x W x 3 RGB, got shape {thumb.shape}")
    thumb = thumb[..., :3].astype(np.float32)
    coords = np.asarray(coords, dtype=float).reshape(-1, 2)
    scores = np.asarray(scores, dtype=float).ravel()
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} scores")
    h, w = thumb.shape[:2]
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    if len(scores):
        ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
        norm = ranks / max(len(scores) - 1, 1)
        size = tile_size_level0 * level0_scale
        x0 = np.clip(np.floor(coords[:, 0] * level0_scale).astype(int), 0, w)
        y0 = np.clip(np.floor(coords[:, 1] * level0_scale).astype(int), 0, h)
        x1 = np.clip(np.maximum(np.ceil(coords[:, 0] * level0_scale + size).astype(int), x0 + 1), 0, w)
        y1 = np.clip(np.maximum(np.ceil(coords[:, 1] * level0_scale + size).astype(int), y0 + 1), 0, h)
        for a, b, c, d, s in zip(y0, y1, x0, x1, norm, strict=True):
            acc[a:b, c:d] += s
            cnt[a:b, c:d] += 1
    covered = cnt > 0
    heat = np.divide(acc, cnt, out=np.zeros_like(acc), where=covered)
    colours = plt.get_cmap(cmap)(heat)[..., :3] * 255.0
    out = thumb.copy()
    out[covered] = (1 - alpha) * thumb[covered] + alpha * colours[covered]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
