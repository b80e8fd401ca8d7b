"""ConceptCLIP's text tower: the checkpoint's own `encode_text` (remote code, opt-in), its BertTokenizer.

Loaded like the image side (hf_conceptclip): pinned revision, Hugging Face cache, local_files_only, remote code
only with encoder.trust_remote_code. Prompts are tokenised with the BertTokenizer in the checkpoint folder
(`vocab.txt`, PubMedBERT), padded to and truncated at 77 tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from wsi_pipeline.encoders.base import ModelSource, weight_files
from wsi_pipeline.encoders.config import EncoderConfig
from wsi_pipeline.encoders.hf_conceptclip import check_remote_code, resolve_conceptclip_dir
from wsi_pipeline.encoders.text import TorchTextEncoder, bert_token_functions, pooled_text
from wsi_pipeline.errors import EncoderError, first_line

CONCEPTCLIP_CONTEXT_LENGTH = 77


def build_conceptclip_text(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTextEncoder:
    what = f"text encoder {cfg.name!r}"
    model_dir, revision, hint, repo_id = resolve_conceptclip_dir(cfg, what)
    check_remote_code(model_dir, cfg, what, hint, revision)
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

    tokenize, count = bert_token_functions(tokenizer, CONCEPTCLIP_CONTEXT_LENGTH)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if "attention_mask" in params:
            kwargs["attention_mask"] = batch["attention_mask"]
        if "normalize" in params:
            kwargs["normalize"] = False
        return pooled_text(encode(batch["input_ids"], **kwargs))

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
