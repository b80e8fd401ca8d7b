"""Concept text embeddings, computed once per (text model, prompt set) and cached on disk.

    emb = concept_embeddings(text_encoder, load_concept_set("tissue"), layout.text_cache_dir("conceptclip"))
    emb.embeddings   # (C, D) float32, unit rows: each concept's prompt ensemble (prompts x templates, averaged)

The cache key is the text model (encoder name, model id, revision, weights checksum) plus the prompt-set hash
(`concepts.prompt_set_hash`): editing a prompt or template, or changing the model, embeds again; renaming or
re-describing a set does not. Files are `{set}-{prompt hash}-{model key}.npz` + `.json`, written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.atomic import write_bytes_atomic
from ..io.jsonio import read_json, write_json_atomic
from .concepts import prompt_set_hash
from .config import ConceptSet, ConceptSpec

if TYPE_CHECKING:
    from ..encoders.text import TextEncoder

log = logging.getLogger(__name__)

KEY_CHARS = 16  # hex characters of each hash in a cache file name


@dataclass
class ConceptEmbeddings:
    """A concept set's text side: one unit-norm row per concept, and what produced it."""

    concept_set: str
    concepts: list[str]
    embeddings: np.ndarray  # (C, D) float32
    prompt_hash: str
    logit_scale: float
    logit_bias: float | None = None
    text_provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def provenance(self) -> dict[str, Any]:
        """What a score store records about its text side."""
        return {
            "concept_set": self.concept_set,
            "prompt_hash": self.prompt_hash,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "text_encoder": self.text_provenance,
        }


def text_model_key(provenance: dict[str, Any]) -> str:
    """A short hash naming the text model: encoder, model id, revision and weights checksum."""
    fields = {k: provenance.get(k) for k in ("encoder", "model_id", "revision", "weights_sha256", "random_weights")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def class_prompt_set(name: str, prompts: dict[str, Sequence[str]], templates: Sequence[str]) -> ConceptSet:
    """A concept set from zero-shot class prompts: one concept per class, in the given order."""
    return ConceptSet(
        name=name,
        templates=list(templates),
        concepts=[ConceptSpec(name=str(c), prompts=list(p)) for c, p in prompts.items()],
    )


def concept_embeddings(
    text_encoder: TextEncoder, concept_set: ConceptSet, cache_dir: str | Path | None = None
) -> ConceptEmbeddings:
    """The set's prompt-ensemble embeddings, read from `cache_dir` when this model embedded these prompts before."""
    from ..encoders.text import build_concept_embeddings

    phash = prompt_set_hash(concept_set)
    prov = text_encoder.provenance()
    stem = f"{concept_set.name}-{phash[:KEY_CHARS]}-{text_model_key(prov)}"
    if cache_dir is not None:
        cached = _read_cache(Path(cache_dir) / stem, concept_set, phash)
        if cached is not None:
            return cached
    emb = build_concept_embeddings(text_encoder, concept_set.prompt_texts()).numpy().astype(np.float32)
    out = ConceptEmbeddings(
        concept_set=concept_set.name,
        concepts=concept_set.concept_names,
        embeddings=emb,
        prompt_hash=phash,
        logit_scale=float(text_encoder.logit_scale),
        logit_bias=text_encoder.logit_bias,
        text_provenance=prov,
    )
    if cache_dir is not None:
        _write_cache(Path(cache_dir) / stem, out)
    return out


def _write_cache(stem: Path, emb: ConceptEmbeddings) -> None:
    buf = io.BytesIO()
    np.save(buf, emb.embeddings, allow_pickle=False)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(stem.with_suffix(".npy"), buf.getvalue())
    meta = {k: v for k, v in emb.__dict__.items() if k != "embeddings"}
    write_json_atomic(stem.with_suffix(".json"), meta)


def _read_cache(stem: Path, concept_set: ConceptSet, phash: str) -> ConceptEmbeddings | None:
    npy, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        arr = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:  # a damaged cache entry is recomputed, never trusted
        log.warning("text embedding cache %s is unreadable (%s); embedding the prompts again", npy, e)
        return None
    if meta.get("prompt_hash") != phash or meta.get("concepts") != concept_set.concept_names:
        return None
    if arr.ndim != 2 or arr.shape[0] != len(concept_set.concepts) or not np.isfinite(arr).all():
        log.warning("text embedding cache %s has shape %s or non-finite values; embedding again", npy, arr.shape)
        return None
    return ConceptEmbeddings(
        concept_set=concept_set.name,
        concepts=list(meta["concepts"]),
        embeddings=arr.astype(np.float32),
        prompt_hash=phash,
        logit_scale=float(meta["logit_scale"]),
        logit_bias=meta.get("logit_bias"),
        text_provenance=dict(meta.get("text_provenance") or {}),
    )
