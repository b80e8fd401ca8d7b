"""Tile-text similarity from stored features: the one place the cosine, the model's softmax and the check that
features and text embeddings come from the same model are written.

A stored tile feature is the encoder's pooled image output before normalisation (`encode_image(...,
normalize=False)`); the model's image-text logits are `logit_scale * cos(feature, text)`, so scores computed here
from stored features equal the model's own logits: no tile is encoded twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FeatureError

EPS = 1e-12


def tile_cosine(features: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(N, D) features x (C, D) unit text embeddings -> (N, C) float32 cosine; a zero feature row is an error."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if x.size and not np.isfinite(x).all():
        raise FeatureError("features contain NaN or inf; re-encode the slide (wsi-pipeline encode --force)")
    if x.size and (norms < EPS).any():
        raise FeatureError(f"{int((norms < EPS).sum())} tile features are all zero; re-encode the slide")
    return ((x / np.maximum(norms, EPS)) @ np.asarray(embeddings, dtype=np.float32).T).astype(np.float32)


def softmax_at_scale(cosine: np.ndarray, logit_scale: float, logit_bias: float | None = None) -> np.ndarray:
    """Row-wise softmax of `logit_scale * cosine (+ bias)`: the model's own zero-shot probabilities over a set."""
    logits = np.asarray(cosine, dtype=np.float64) * float(logit_scale) + (logit_bias or 0.0)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _model_id(prov: dict[str, Any]) -> str:
    name = prov.get("encoder")
    where = prov.get("model_id") or prov.get("path") or "built-in"
    rev = prov.get("revision") or "unpinned"
    sha = prov.get("weights_sha256")
    return f"{name} ({where}, revision {rev}, weights {str(sha)[:12] if sha else 'none'})"


def check_same_model(feature_attrs: dict[str, Any], text_provenance: dict[str, Any], store: Path | str) -> None:
    """One FeatureError line when a feature store was written by another encoder or revision than the text tower.

    Same model = same encoder name and, where both record them, the same weights checksum and revision."""
    image = dict(feature_attrs.get("provenance") or {})
    image.setdefault("encoder", feature_attrs.get("encoder"))
    mismatch = image.get("encoder") != text_provenance.get("encoder")
    for key in ("weights_sha256", "revision"):
        a, b = image.get(key), text_provenance.get(key)
        mismatch = mismatch or (a is not None and b is not None and a != b)
    if mismatch:
        raise FeatureError(
            f"{store}: features were written by {_model_id(image)} but the text tower is {_model_id(text_provenance)}; "
            "encode the slides with the same encoder as the text tower (or point encoder: at the model that wrote them)"
        )
