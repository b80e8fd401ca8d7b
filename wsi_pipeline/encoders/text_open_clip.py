"""open_clip text towers (`open_clip`, `whylesionclip`): the same model id / local directory as the image side,
`model.encode_text` with the tokenizer open_clip pairs with it, `logit_scale = model.logit_scale.exp()`."""

from __future__ import annotations

from typing import Any

import torch

from wsi_pipeline.encoders.base import ModelSource, weight_files
from wsi_pipeline.encoders.config import EncoderConfig
from wsi_pipeline.encoders.open_clip_encoder import WHYLESIONCLIP, resolve_open_clip_source
from wsi_pipeline.encoders.text import TorchTextEncoder
from wsi_pipeline.errors import EncoderError, first_line

# The image side's files plus what an HF text tower's tokenizer needs (tokenizer.json, vocab, sentencepiece).
_HUB_FILES = [
    "open_clip_config.json",
    "*.safetensors",
    "*.bin",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "*.model",
]


def open_clip_token_counter(tokenizer: Any) -> Any:
    """`count(prompt) -> tokens incl. special ones, untruncated`, for open_clip's tokenizers; None if unknown."""
    if hasattr(tokenizer, "sot_token_id") and callable(getattr(tokenizer, "encode", None)):  # SimpleTokenizer
        return lambda text: len(tokenizer.encode(text)) + 2  # + start and end of text
    hf = getattr(tokenizer, "tokenizer", None)  # HFTokenizer, SigLipTokenizer wrap a transformers tokenizer
    if hf is not None and callable(hf):
        clean = getattr(tokenizer, "clean_fn", None) or (lambda text: text)  # as HFTokenizer cleans before
        return lambda text: len(hf(clean(text), add_special_tokens=True, truncation=False)["input_ids"])
    return None


def build_open_clip_text(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTextEncoder:
    import open_clip

    what = f"text encoder {cfg.name!r}"
    source, revision, arch = resolve_open_clip_source(cfg, what, _HUB_FILES)
    try:
        if source.is_dir():
            if not (source / "open_clip_config.json").is_file():
                raise EncoderError(f"{what}: {source} has no open_clip_config.json; is it an open_clip model?")
            name = f"local-dir:{source}"
            model = open_clip.create_model(name, pretrained_text=False)
        else:
            if not arch:
                raise EncoderError(f"{what}: {source} is a checkpoint file: set encoder.model_id to its architecture")
            name = arch
            model = open_clip.create_model(arch, pretrained=str(source), pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name)
    except EncoderError:
        raise
    except Exception as e:
        raise EncoderError(f"{what}: open_clip cannot load {source} ({type(e).__name__}: {first_line(e)})") from e
    if not callable(getattr(model, "encode_text", None)) or getattr(model, "logit_scale", None) is None:
        raise EncoderError(f"{what}: {type(model).__name__} from {source} has no text tower (encode_text)")

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        return model.encode_text(tokens, normalize=False)

    context = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None) or 77
    bias = getattr(model, "logit_bias", None)
    src = ModelSource(model_id=cfg.model_id, path=str(source), revision=revision, weight_files=weight_files(source))
    return TorchTextEncoder(
        cfg.name,
        model,
        tokenizer,
        forward,
        open_clip_token_counter(tokenizer),
        int(context),
        float(model.logit_scale.detach().exp()),
        src,
        device,
        logit_bias=None if bias is None else float(bias.detach()),
        extra={"tokenizer": type(tokenizer).__name__},
    )


def build_whylesionclip_text(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTextEncoder:
    """Preset: WhyLesionCLIP's text tower unless model_id/path say otherwise (as the image side)."""
    if cfg.model_id is None and cfg.path is None:
        cfg = cfg.model_copy(update={"model_id": WHYLESIONCLIP})
    return build_open_clip_text(cfg, device)
