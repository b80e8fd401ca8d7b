"""open_clip image towers (e.g. WhyLesionCLIP `hf-hub:yyupenn/whylesionclip`, ViT-L-14): `encode_image` output."""

from __future__ import annotations

from pathlib import Path

import torch

from wsi_pipeline.encoders.base import ModelSource, TorchTileEncoder, weight_files
from wsi_pipeline.encoders.config import EncoderConfig, Preprocessing, rgb_triple
from wsi_pipeline.encoders.hub import resolve_model_dir
from wsi_pipeline.encoders.preprocess import with_size
from wsi_pipeline.errors import EncoderError, first_line

WHYLESIONCLIP = "hf-hub:yyupenn/whylesionclip"
_HUB_FILES = ["open_clip_config.json", "*.safetensors", "*.bin"]


def open_clip_preprocessing(model: torch.nn.Module) -> Preprocessing:
    """The model's preprocess config. Tiles are square, so shortest-edge resize + centre crop is a squash."""
    import open_clip

    pc = open_clip.get_model_preprocess_cfg(model)
    size = pc.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    interpolation = pc.get("interpolation", "bicubic")
    return Preprocessing(
        size=int(size),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
        mean=rgb_triple(pc.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=rgb_triple(pc.get("std", open_clip.OPENAI_DATASET_STD)),
    )


def resolve_open_clip_source(
    cfg: EncoderConfig, what: str, allow_patterns: list[str] | None = None
) -> tuple[Path, str | None, str | None]:
    """(directory or checkpoint file, revision, architecture) of an open_clip model: `model_id` =
    "hf-hub:org/name" through the HF cache (revision honoured), or an architecture with `path` = checkpoint file,
    or `path` = a directory with open_clip_config.json. Image and text towers resolve through here."""
    model_id = cfg.model_id
    arch: str | None = None
    repo_id: str | None = None
    if cfg.path is None:
        if not model_id:
            raise EncoderError(f"{what}: set encoder.model_id (hf-hub:org/name) or encoder.path")
        if model_id.startswith("hf-hub:"):
            repo_id = model_id[len("hf-hub:") :]
        elif "/" in model_id:
            repo_id = model_id
        else:
            raise EncoderError(
                f"{what}: architecture {model_id!r} needs weights: set encoder.path to a checkpoint file"
            )
    elif model_id and not model_id.startswith("hf-hub:"):
        arch = model_id
    source, revision = resolve_model_dir(
        path=cfg.path,
        repo_id=repo_id,
        revision=cfg.revision,
        cache_dir=cfg.cache_dir,
        local_files_only=cfg.local_files_only,
        what=what,
        allow_patterns=allow_patterns or _HUB_FILES,
    )
    return source, revision, arch


def build_open_clip(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTileEncoder:
    """`model_id` = "hf-hub:org/name" (resolved through the HF cache, revision honoured) or a built-in
    architecture ("ViT-L-14") with `path` = checkpoint file; or `path` = directory with open_clip_config.json."""
    import open_clip

    what = f"encoder {cfg.name!r}"
    source_dir, revision, arch = resolve_open_clip_source(cfg, what)
    kwargs = {"force_image_size": cfg.image_size} if cfg.image_size else {}
    try:
        if source_dir.is_dir():
            if not (source_dir / "open_clip_config.json").is_file():
                raise EncoderError(f"{what}: {source_dir} has no open_clip_config.json; is it an open_clip model?")
            model = open_clip.create_model(f"local-dir:{source_dir}", pretrained_text=False, **kwargs)
        else:
            if not arch:
                raise EncoderError(
                    f"{what}: {source_dir} is a checkpoint file: set encoder.model_id to its architecture"
                )
            model = open_clip.create_model(arch, pretrained=str(source_dir), pretrained_text=False, **kwargs)
    except EncoderError:
        raise
    except Exception as e:
        first = first_line(e)
        raise EncoderError(f"{what}: open_clip cannot load {source_dir} ({type(e).__name__}: {first})") from e

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixels, normalize=False)

    prep = with_size(open_clip_preprocessing(model), cfg.image_size)
    dim = getattr(model.visual, "output_dim", None)
    source = ModelSource(
        model_id=cfg.model_id, path=str(source_dir), revision=revision, weight_files=weight_files(Path(source_dir))
    )
    return TorchTileEncoder(cfg.name, model, forward, dim, prep, source, cfg, device)


def build_whylesionclip(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTileEncoder:
    """Preset: WhyLesionCLIP (open_clip ViT-L-14) unless model_id/path say otherwise."""
    if cfg.model_id is None and cfg.path is None:
        cfg = cfg.model_copy(update={"model_id": WHYLESIONCLIP})
    return build_open_clip(cfg, device)
