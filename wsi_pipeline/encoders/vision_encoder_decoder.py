"""The vision tower of a transformers VisionEncoderDecoderModel (medical captioners, e.g. a CLIP ViT-B/16 encoder).

Pooling: the encoder's `pooler_output` when the pooler is part of the trained path (CLIP/SigLIP post-layernorm or
attention head, Swin average pool); the CLS token of `last_hidden_state` when the pooler is a separate dense
layer (ViT/DeiT/BEiT), because captioners never train that layer and checkpoints often leave it random.
"""

from __future__ import annotations

import torch

from wsi_pipeline.encoders.base import ModelSource, TorchTileEncoder, weight_files
from wsi_pipeline.encoders.config import EncoderConfig, Preprocessing
from wsi_pipeline.encoders.hub import resolve_model_dir
from wsi_pipeline.encoders.preprocess import preprocessing_from_processor_config, with_size
from wsi_pipeline.errors import EncoderError, first_line


def _untrained_dense_pooler(encoder: torch.nn.Module) -> bool:
    pooler = getattr(encoder, "pooler", None)
    return isinstance(pooler, torch.nn.Module) and any(True for _ in pooler.parameters())


def build_vision_encoder_decoder(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTileEncoder:
    what = f"encoder {cfg.name!r}"
    model_dir, revision = resolve_model_dir(
        path=cfg.path,
        repo_id=cfg.model_id if cfg.path is None else None,
        revision=cfg.revision,
        cache_dir=cfg.cache_dir,
        local_files_only=cfg.local_files_only,
        what=what,
    )
    from transformers import VisionEncoderDecoderModel

    try:
        full = VisionEncoderDecoderModel.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        first = first_line(e)
        raise EncoderError(f"{what}: cannot load a VisionEncoderDecoderModel from {model_dir} ({first})") from e
    encoder = full.get_encoder()
    del full  # keep only the vision tower; the text decoder is not needed
    use_cls = _untrained_dense_pooler(encoder)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out = encoder(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if use_cls or pooled is None:
            return out.last_hidden_state[:, 0]
        return pooled.flatten(1)

    ecfg = encoder.config
    image_size = getattr(ecfg, "image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    fallback = Preprocessing(size=int(image_size))
    proc = model_dir / "preprocessor_config.json"
    prep = preprocessing_from_processor_config(proc, fallback) if proc.is_file() else fallback
    prep = with_size(prep, cfg.image_size)
    source = ModelSource(
        model_id=cfg.model_id, path=str(model_dir), revision=revision, weight_files=weight_files(model_dir)
    )
    enc = TorchTileEncoder(cfg.name, encoder, forward, None, prep, source, cfg, device)
    enc._provenance_extra.update(
        {
            "pooling": "cls" if use_cls else "pooler_output",
            "encoder_type": getattr(ecfg, "model_type", type(encoder).__name__),
            "preprocessing_source": "preprocessor_config.json" if proc.is_file() else "default (no processor config)",
        }
    )
    return enc
