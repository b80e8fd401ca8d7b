"""Text towers for stage 4 (explain): prompts -> L2-normalised embeddings in the image encoder's space.

    tenc = build_text_encoder(EncoderConfig(name="conceptclip", trust_remote_code=True), "cuda:0")
    emb = tenc.encode_text(["an H&E image of tumour", ...])            # (P, D) float32, unit rows, CPU
    concepts = build_concept_embeddings(tenc, [["a photo of {c}", ...], ...])  # (C, D), prompt ensembles
    logits = tenc.logit_scale * image_emb_normalised @ concepts.T

Only encoders that were trained with a text tower have one (`available_text_encoders()`); the others raise a
one-line EncoderError. Builders live in `text_open_clip`, `text_conceptclip` and `text_random`
(ConceptCLIP's text architecture with random weights), imported on first use.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from wsi_pipeline.encoders.base import ModelSource, library_versions, weights_digest
from wsi_pipeline.encoders.config import EncoderConfig
from wsi_pipeline.encoders.text_registry import (  # noqa: F401  (register/available: re-exported for users)
    available_text_encoders,
    no_text_tower_message,
    register_text_encoder,
    text_tower_builder,
)
from wsi_pipeline.errors import ConfigError, EncoderError

log = logging.getLogger(__name__)

TEXT_BATCH = 256  # prompts per forward pass

TextBuilder = Callable[[EncoderConfig, torch.device], "TextEncoder"]


class TextEncoder(abc.ABC):
    """A text tower: prompts in, one L2-normalised float32 row per prompt out (on the CPU)."""

    name: str
    embed_dim: int
    context_length: int
    logit_scale: float  # exp of the learned log-temperature: logits = logit_scale * cos
    logit_bias: float | None = None  # SigLIP-style models only
    device: torch.device

    @abc.abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts -> (P, embed_dim) float32 on the CPU, each row of unit L2 norm."""

    @abc.abstractmethod
    def provenance(self) -> dict[str, Any]:
        """What produced the embeddings: encoder, model id/path, revision, weights checksum, versions."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, embed_dim={self.embed_dim}, device={self.device})"


class TorchTextEncoder(TextEncoder):
    """A learned text tower: `tokenize(prompts) -> batch`, `forward(batch) -> (P, D)`, `count(prompt) -> n tokens`.

    `count` is the prompt's length in tokens including special tokens, untruncated; prompts longer than
    `context_length` are truncated by the tokenizer and listed in one warning.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        tokenize: Callable[[list[str]], Any],
        forward: Callable[[Any], torch.Tensor],
        count_tokens: Callable[[str], int] | None,
        context_length: int,
        logit_scale: float,
        source: ModelSource,
        device: torch.device | str = "cpu",
        logit_bias: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self._tokenize = tokenize
        self._forward = forward
        self._count_tokens = count_tokens
        self.context_length = int(context_length)
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.source = source
        self.extra = dict(extra or {})
        self._weights: dict[str, Any] | None = None
        self.embed_dim = int(self._encode([""]).shape[1])

    def truncated_prompts(self, prompts: Sequence[str]) -> list[tuple[str, int]]:
        """(prompt, length in tokens) of every prompt longer than the context length."""
        if self._count_tokens is None:
            return []
        counts = [(p, self._count_tokens(p)) for p in prompts]
        return [(p, n) for p, n in counts if n > self.context_length]

    @torch.inference_mode()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), TEXT_BATCH):
            batch = self._tokenize(prompts[i : i + TEXT_BATCH])
            batch = (
                {k: v.to(self.device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(self.device)
            )
            emb = self._forward(batch)
            if emb.ndim != 2:
                raise EncoderError(
                    f"text encoder {self.name!r} returns shape {tuple(emb.shape)}; expected (batch, dim)"
                )
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [str(p) for p in prompts]
        if not prompts:
            return torch.zeros(0, self.embed_dim)
        cut = self.truncated_prompts(prompts)
        if cut:
            shown = "; ".join(f"{p!r} ({n} tokens)" for p, n in cut)
            log.warning(
                "text encoder %r: %d of %d prompts are longer than the context length (%d tokens) and were "
                "truncated: %s",
                self.name,
                len(cut),
                len(prompts),
                self.context_length,
                shown,
            )
        return self._encode(prompts)

    def provenance(self) -> dict[str, Any]:
        if self._weights is None:  # hashed once per encoder
            self._weights = weights_digest(self.source.weight_files)
        out: dict[str, Any] = {
            "encoder": self.name,
            "tower": "text",
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "model_id": self.source.model_id,
            "path": os.fspath(self.source.path) if self.source.path else None,
            "revision": self.source.revision,
            "weights_sha256": self._weights["sha256"],
            "weight_files": self._weights["files"],
            "random_weights": self.source.random_weights,
            "device": str(self.device),
        }
        out.update(self.extra)
        out["library_versions"] = library_versions()
        return out


def build_concept_embeddings(text_encoder: TextEncoder, prompts_per_concept: Sequence[Sequence[str]]) -> torch.Tensor:
    """(C, D): per concept, its prompts embedded and normalised, averaged, renormalised (a prompt ensemble).

    The same numbers as `open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates).T`.
    """
    sizes = [len(p) for p in prompts_per_concept]
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise ConfigError(f"concepts {empty[:10]} have no prompts; give each concept at least one prompt")
    if not sizes:
        return torch.zeros(0, text_encoder.embed_dim)
    flat = [str(p) for prompts in prompts_per_concept for p in prompts]
    emb = text_encoder.encode_text(flat)
    rows = [chunk.mean(dim=0) for chunk in torch.split(emb, sizes)]
    means = torch.stack(rows)
    return means / means.norm(dim=1, keepdim=True)


def build_text_encoder(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """The text tower of the configured encoder on `device`; one-line EncoderError if it has none."""
    builder = text_tower_builder(cfg.name)
    if builder is None:
        raise EncoderError(no_text_tower_message(cfg.name))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"text encoder {cfg.name!r}: device {device} requested but CUDA is not available")
    if not callable(builder):
        module, func = builder.split(":")
        builder = getattr(importlib.import_module(module), func)
    return builder(cfg, device)


def pooled_text(out: Any) -> torch.Tensor:
    """The pooled text embedding from a tensor, a (pooled, tokens) tuple, or a model output / dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for key in ("text_features", "text_embeds", "pooler_output"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    raise EncoderError(f"encode_text returned {type(out).__name__}; expected a tensor or a (pooled, tokens) tuple")


def bert_token_functions(
    tokenizer: Any, context_length: int
) -> tuple[Callable[[list[str]], dict[str, torch.Tensor]], Callable[[str], int]]:
    """(tokenize, count) for a Hugging Face BERT-style tokenizer: prompts padded to and truncated at
    `context_length` (input_ids + attention_mask), and a prompt's untruncated length in tokens."""

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    return tokenize, count
