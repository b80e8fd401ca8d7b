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
BLOCK_ROWS = 256  # rows widened to float32 at a time in `cosine_block`: ~1 MB, stays in cache


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


def cosine_block(
    features: np.ndarray, embeddings_t: np.ndarray, where: str = "features", first_row: int = 0
) -> np.ndarray:
    """`tile_cosine` for the cohort scorer's blocks, within float32 rounding of it: (N, D) float16/32 features x
    (D, C) unit text embeddings (transposed) -> (N, C) float32. Rows are widened to float32 a few hundred
    at a time (cache-sized, never a float32 copy of the block) and the norms divide the product, not the features:
    one matmul per block, so reading the features stays the larger cost. Bad rows are one FeatureError naming `where`
    and the row (`first_row` is the block's first row in the store)."""
    import torch

    x, text = _writable(features), torch.from_numpy(_writable(embeddings_t, np.float32))
    n, d = x.shape
    out = np.empty((n, text.shape[1]), dtype=np.float32)
    lengths = np.empty(n, dtype=np.float32)
    src, res, norms = torch.from_numpy(x), torch.from_numpy(out), torch.from_numpy(lengths)
    buf = torch.empty((min(BLOCK_ROWS, n), d), dtype=torch.float32)
    for i in range(0, n, BLOCK_ROWS):
        m = min(BLOCK_ROWS, n - i)
        rows = buf[:m]
        rows.copy_(src[i : i + m])
        torch.mm(rows, text, out=res[i : i + m])
        torch.linalg.vector_norm(rows, dim=1, out=norms[i : i + m])
    if n and not np.isfinite(lengths).all():  # a NaN/inf anywhere in a row makes its norm NaN/inf
        bad = np.flatnonzero(~np.isfinite(lengths))
        raise FeatureError(
            f"{where}: {len(bad)} tile features contain NaN or inf (first: row {first_row + int(bad[0])}, never "
            "written or overflowed); re-encode the slide (wsi-pipeline encode --force)"
        )
    if n and (lengths < EPS).any():
        raise FeatureError(f"{where}: {int((lengths < EPS).sum())} tile features are all zero; re-encode the slide")
    out /= lengths[:, None]
    return out


def softmax_block(cosine: np.ndarray, logit_scale: float, logit_bias: float | None = None) -> np.ndarray:
    """`softmax_at_scale` in float32 (max-subtracted, so stable), for the cohort scorer's blocks: the same
    probabilities within float32 rounding at a third of the cost."""
    import torch

    logits = np.multiply(cosine, np.float32(logit_scale), dtype=np.float32)
    if logit_bias:
        logits += np.float32(logit_bias)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def _writable(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    # torch.from_numpy shares memory and warns on read-only arrays; a copy is made only when needed
    out = np.ascontiguousarray(a, dtype=dtype)
    return out if out.flags.writeable else out.copy()


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
