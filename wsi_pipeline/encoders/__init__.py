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

import torch

from wsi_pipeline.encoders.base import (
    CONCEPTCLIP_REPO,
    CONCEPTCLIP_REVISION,
    EncoderConfig,
    Preprocessing,
    TileEncoder,
    TorchTileEncoder,
    check_finite,
)
from wsi_pipeline.encoders.preprocess import (
    preprocess_on_device,
    preprocessing_from_processor_config,
    reference_preprocess_pil,
)
from wsi_pipeline.errors import EncoderError

Builder = Callable[[EncoderConfig, torch.device], TileEncoder]

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
