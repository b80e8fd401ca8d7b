"""ConceptCLIP's text tower: the checkpoint's own `encode_text` (remote code, opt-in), its BertTokenizer.

Loaded like the image side (hf_conceptclip): pinned revision, Hugging Face cache, local_files_only, remote code
only with encoder.trust_remote_code. Prompts are tokenised with the BertTokenizer in the checkpoint folder
(`vocab.txt`, PubMedBERT), padded to and truncated at 77 tokens.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.encoders.base import ModelSource, weight_files
from wsi_pipeline.encoders.config import EncoderConfig
from wsi_pipeline.encoders.hf_conceptclip import resolve_conceptclip_dir
from wsi_pipeline.encoders.text import TorchTextEncoder, pooled_text
from wsi_pipeline.errors import EncoderError, first_line

CONCEPTCLIP_CONTEXT_LENGTH = 77


def _remote_code_files(model_dir: Path, what: str, hint: str) -> list[str]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EncoderError(f"{what}: {cfg_path} is missing, so {model_dir} is not a model directory; {hint}")
    try:
        auto_map = json.loads(cfg_path.read_text()).get("auto_map") or {}
    except ValueError as e:
        raise EncoderError(f"{what}: {cfg_path} is not valid JSON ({e}); re-download the model") from e
    if not auto_map:
        return []
    return sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)}) or ["auto_map"]


def build_conceptclip_text(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTextEncoder:
    what = f"text encoder {cfg.name!r}"
    model_dir, revision, hint, repo_id = resolve_conceptclip_dir(cfg, what)
    code = _remote_code_files(model_dir, what, hint)
    if code and not cfg.trust_remote_code:
        raise EncoderError(
            f"{what}: {model_dir} runs its own Python code ({', '.join(code)}); loading it needs "
            f"encoder.trust_remote_code: true in the config, which you should set only for a source you trust "
            f"(revision {revision or 'unpinned'})"
        )
    if not (model_dir / "vocab.txt").is_file():
        raise EncoderError(f"{what}: {model_dir} has no vocab.txt (the text tower's BertTokenizer); {hint}")

    from transformers import AutoModel, BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(
            str(model_dir), trust_remote_code=cfg.trust_remote_code, local_files_only=True
        )
    except Exception as e:  # transformers raises many types; the user needs one line either way
        raise EncoderError(f"{what}: cannot load the model in {model_dir} ({type(e).__name__}: {first_line(e)})") from e
    encode = getattr(model, "encode_text", None)
    scale = getattr(model, "logit_scale", None)
    if not callable(encode) or not isinstance(scale, torch.Tensor):
        raise EncoderError(
            f"{what}: {type(model).__name__} from {model_dir} has no encode_text() and logit_scale; "
            "is this a ConceptCLIP checkpoint?"
        )
    params = inspect.signature(encode).parameters

    def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=CONCEPTCLIP_CONTEXT_LENGTH,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if "attention_mask" in params:
            kwargs["attention_mask"] = batch["attention_mask"]
        if "normalize" in params:
            kwargs["normalize"] = False
        return pooled_text(encode(batch["input_ids"], **kwargs))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    bias = getattr(model, "logit_bias", None)
    source = ModelSource(model_id=repo_id, path=str(model_dir), revision=revision, weight_files=weight_files(model_dir))
    return TorchTextEncoder(
        cfg.name,
        model,
        tokenize,
        forward,
        count,
        CONCEPTCLIP_CONTEXT_LENGTH,
        float(scale.detach().exp()),
        source,
        device,
        logit_bias=float(bias.detach()) if isinstance(bias, torch.Tensor) and bias.numel() == 1 else None,
        extra={
            "trust_remote_code": cfg.trust_remote_code,
            "model_class": type(model).__name__,
            "tokenizer": type(tokenizer).__name__,
        },
    )
