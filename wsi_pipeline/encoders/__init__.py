"""Tile encoders by name: `build_encoder(EncoderConfig(name=...), device)` -> TileEncoder.

Every encoder takes (B, H, W, 3) uint8 tiles on its device and returns (B, embed_dim) float32 on that device;
`provenance()` says exactly what produced the numbers. Heavy libraries (transformers, open_clip, timm) are imported
only when an encoder that needs them is built.

    enc = build_encoder(EncoderConfig(name="conceptclip", trust_remote_code=True), "cuda:0")  # one per GPU
    emb = enc.encode_uint8(tiles_uint8_on_gpu)        # (B, H, W, 3) uint8 -> (B, enc.embed_dim) float32
    check_finite(emb, f"{slide_id} tiles {i}-{j}")    # FeatureError, one line, if NaN/inf
    meta = enc.provenance()                           # JSON-able: store beside the embeddings
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wsi_pipeline.encoders.config import CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION, EncoderConfig, Preprocessing
from wsi_pipeline.errors import EncoderError

if TYPE_CHECKING:
    import torch

    from wsi_pipeline.encoders.base import TileEncoder

Builder = Callable[[EncoderConfig, "torch.device"], "TileEncoder"]

# Names that need torch, imported on first use: reading the `encoder:` config must not load torch.
_LAZY = {
    "TileEncoder": "wsi_pipeline.encoders.base",
    "TorchTileEncoder": "wsi_pipeline.encoders.base",
    "check_finite": "wsi_pipeline.encoders.base",
    "preprocess_on_device": "wsi_pipeline.encoders.preprocess",
    "preprocessing_from_processor_config": "wsi_pipeline.encoders.preprocess",
    "reference_preprocess_pil": "wsi_pipeline.encoders.preprocess",
    # text towers (stage 4): prompts -> L2-normalised embeddings in the image features' space
    "TextEncoder": "wsi_pipeline.encoders.text",
    "TorchTextEncoder": "wsi_pipeline.encoders.text",
    "available_text_encoders": "wsi_pipeline.encoders.text_registry",
    "build_concept_embeddings": "wsi_pipeline.encoders.text",
    "build_text_encoder": "wsi_pipeline.encoders.text",
    "register_text_encoder": "wsi_pipeline.encoders.text_registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# name -> "module:function", imported lazily so `import wsi_pipeline.encoders` stays light.
_REGISTRY: dict[str, str | Builder] = {
    "conceptclip": "wsi_pipeline.encoders.hf_conceptclip:build_conceptclip",
    "conceptclip-arch-random": "wsi_pipeline.encoders.timm_encoder:build_conceptclip_arch_random",
    "open_clip": "wsi_pipeline.encoders.open_clip_encoder:build_open_clip",
    "whylesionclip": "wsi_pipeline.encoders.open_clip_encoder:build_whylesionclip",
    "timm": "wsi_pipeline.encoders.timm_encoder:build_timm",
    "vision-encoder-decoder": "wsi_pipeline.encoders.vision_encoder_decoder:build_vision_encoder_decoder",
    "stain-texture": "wsi_pipeline.encoders.stain_texture:build_stain_texture",
}


def register_encoder(name: str, builder: str | Builder) -> None:
    """Add (or replace) an encoder: `builder(cfg, device) -> TileEncoder`, or its "module:function" path."""
    _REGISTRY[name] = builder


def available_encoders() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(builder: str | Builder) -> Builder:
    if callable(builder):
        return builder
    module, func = builder.split(":")
    return getattr(importlib.import_module(module), func)


def build_encoder(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TileEncoder:
    """Build the configured encoder on `device` (moved there, eval mode, compiled if cfg.compile)."""
    import torch

    if cfg.name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {cfg.name!r} (encoder.name); available: {', '.join(available_encoders())}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"encoder {cfg.name!r}: device {device} requested but CUDA is not available")
    return _resolve(_REGISTRY[cfg.name])(cfg, device)


__all__ = [
    "CONCEPTCLIP_REPO",
    "CONCEPTCLIP_REVISION",
    "EncoderConfig",
    "Preprocessing",
    "TileEncoder",
    "TorchTileEncoder",
    "available_encoders",
    "build_encoder",
    "check_finite",
    "preprocess_on_device",
    "preprocessing_from_processor_config",
    "reference_preprocess_pil",
    "register_encoder",
]
