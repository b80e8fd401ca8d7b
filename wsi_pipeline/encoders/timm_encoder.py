"""timm image models (pooled features, `num_classes=0`), and ConceptCLIP's vision architecture with random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.encoders.base import ModelSource, TorchTileEncoder, weight_files
from wsi_pipeline.encoders.config import EncoderConfig, Preprocessing, rgb_triple
from wsi_pipeline.encoders.hub import resolve_model_dir
from wsi_pipeline.encoders.preprocess import with_size
from wsi_pipeline.errors import EncoderError

# ConceptCLIP's image tower: SigLIP so400m/14 at 384 px with attention (MAP) pooling, 1152-d.
CONCEPTCLIP_ARCH = "vit_so400m_patch14_siglip_384"
RANDOM_SEED = 0


def timm_preprocessing(model: torch.nn.Module) -> Preprocessing:
    """The model's own data config (input size, interpolation, mean/std) as a squash-resize Preprocessing."""
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    interpolation = dc.get("interpolation", "bicubic")
    size = int(dc["input_size"][-1])
    # The pretrained config states the tag's size; a model built with another img_size expects that one.
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        size = int(built[-1] if isinstance(built, (tuple, list)) else built)
    return Preprocessing(
        size=size,
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
        mean=rgb_triple(dc["mean"]),
        std=rgb_triple(dc["std"]),
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _timm_dir_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    return json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}


def _pick_weights(files: list[Path]) -> Path:
    # Prefer safetensors (no pickle), then the conventional names.
    ranked = sorted(files, key=lambda f: (not f.name.endswith(".safetensors"), "model" not in f.name, f.name))
    return ranked[0]


def build_timm(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTileEncoder:
    """timm model: `path` = timm-style directory (config.json + model.safetensors) or checkpoint file with
    `model_id` = architecture; or `model_id` = "hf-hub:org/name" / a pretrained tag resolved via the HF cache."""
    import timm

    what = f"encoder {cfg.name!r}"
    arch = cfg.model_id
    repo_id = None
    if cfg.path is None:
        if not arch:
            raise EncoderError(f"{what}: set encoder.model_id (a timm architecture or hf-hub:org/name) or encoder.path")
        if arch.startswith("hf-hub:"):
            repo_id, arch = arch[len("hf-hub:") :], None
        else:
            try:
                pretrained = timm.models.get_pretrained_cfg(arch)
                repo_id = pretrained.hf_hub_id if pretrained is not None else None
            except Exception:  # unknown name / no default tag
                repo_id = None
            if not repo_id:
                raise EncoderError(f"{what}: timm model {arch!r} has no Hugging Face weights; set encoder.path")
    model_dir, revision = resolve_model_dir(
        path=cfg.path,
        repo_id=repo_id,
        revision=cfg.revision,
        cache_dir=cfg.cache_dir,
        local_files_only=cfg.local_files_only,
        what=what,
    )
    files = weight_files(model_dir)
    dir_cfg = _timm_dir_config(model_dir) if model_dir.is_dir() else {}
    arch = arch if arch and not arch.startswith("hf-hub:") else dir_cfg.get("architecture")
    if arch and "." in arch and model_dir.is_dir():
        arch = arch.split(".")[0]  # a pretrained tag names the weights we already resolved
    if not arch:
        raise EncoderError(f"{what}: no architecture in {model_dir}/config.json; set encoder.model_id")
    kwargs: dict[str, Any] = dict(dir_cfg.get("model_args") or {})
    if "global_pool" in dir_cfg:
        kwargs.setdefault("global_pool", dir_cfg["global_pool"])
    if cfg.image_size:
        kwargs["img_size"] = cfg.image_size
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except Exception as e:
        raise EncoderError(f"{what}: timm cannot build {arch!r} ({type(e).__name__}: {e})") from e
    weights = _pick_weights(files)
    state = load_state_dict_file(weights)
    # timm's plain attributes (pretrained_cfg, num_features, head_hidden_size) are not in nn.Module's typing.
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    heads = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(
            f"{what}: {weights} does not fit {arch} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); "
            "check encoder.model_id"
        )
    prep = with_size(timm_preprocessing(model), cfg.image_size)
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    source = ModelSource(model_id=cfg.model_id or arch, path=str(model_dir), revision=revision, weight_files=files)
    return TorchTileEncoder(cfg.name, model, model, dim, prep, source, cfg, device)


def _fast_random_init(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """Seeded N(0, 0.02) weights, unit norm scales, zero biases: much faster than timm's truncated-normal init
    for 400M parameters, and deterministic for a given seed and device type."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_conceptclip_arch_random(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTileEncoder:
    """ConceptCLIP's vision architecture with random weights: for throughput benchmarks only."""
    import timm

    device = torch.device(device)
    arch = cfg.model_id or CONCEPTCLIP_ARCH
    kwargs: dict[str, Any] = {"img_size": cfg.image_size} if cfg.image_size else {}
    # Build on the meta device and materialise on the target: no 1.7 GB of CPU init work before the copy.
    with torch.device("meta"):
        model = timm.create_model(
            arch, pretrained=False, num_classes=0, global_pool="map", weight_init="skip", **kwargs
        )
    model = model.to_empty(device=device)
    for buf_name, buf in model.named_buffers():
        raise EncoderError(f"{arch} has buffer {buf_name} ({tuple(buf.shape)}) that random init cannot fill")
    _fast_random_init(model, RANDOM_SEED, device)
    prep = with_size(timm_preprocessing(model), cfg.image_size)
    source = ModelSource(model_id=f"timm:{arch}", random_weights=True)
    enc = TorchTileEncoder(cfg.name, model, model, getattr(model, "num_features", None), prep, source, cfg, device)
    enc._provenance_extra.update({"seed": RANDOM_SEED, "note": "random weights: throughput benchmarks only"})
    return enc
