"""Tile preprocessing on the device (the fast path) and the processor-style PIL reference it must match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_pipeline.encoders.config import Preprocessing, rgb_triple
from wsi_pipeline.errors import EncoderError

# PIL resample codes as stored in Hugging Face preprocessor configs.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_TORCH_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}


def preprocess_on_device(
    tiles_uint8: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, H, W, 3) uint8 tiles -> (B, 3, size, size) normalised pixels in `dtype`, on the tiles' device.

    Squash-resize with antialiasing (PIL-like filters, so the result matches the HF processor's PIL path),
    clamp to [0, 255] as PIL's uint8 output does, scale to [0, 1], normalise with mean/std.
    """
    if tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3:
        raise ValueError(f"expected tiles of shape (B, H, W, 3), got {tuple(tiles_uint8.shape)}")
    if tiles_uint8.dtype != torch.uint8:
        raise ValueError(f"expected uint8 tiles, got {tiles_uint8.dtype}")
    x = tiles_uint8.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (prep.size, prep.size):
        mode = _TORCH_MODES.get(prep.interpolation)
        if mode is None:
            raise ValueError(f"unsupported interpolation {prep.interpolation!r}; use one of {sorted(_TORCH_MODES)}")
        kwargs: dict[str, Any] = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
        x = F.interpolate(x, size=(prep.size, prep.size), mode=mode, **kwargs).clamp_(0.0, 255.0)
    # One fused multiply-add: (x / 255 - mean) / std == x * scale + bias.
    std = torch.tensor(prep.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(prep.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.addcmul(-mean / std, x, 1.0 / (255.0 * std))
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def reference_preprocess_pil(tiles: list[Image.Image], prep: Preprocessing) -> torch.Tensor:
    """The processor-style reference: PIL resize (uint8) -> /255 -> normalise; (B, 3, size, size) float32."""
    resample = _PIL_RESAMPLE[prep.interpolation]
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    out = []
    for im in tiles:
        im = im.convert("RGB")
        if im.size != (prep.size, prep.size):
            im = im.resize((prep.size, prep.size), resample=resample)
        a = (np.asarray(im, dtype=np.float32) / 255.0 - mean) / std
        out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
    return torch.stack(out)


def _size_from(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ValueError(f"non-square input size {value}")
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def preprocessing_from_processor_config(
    cfg: dict[str, Any] | str | Path, default: Preprocessing | None = None
) -> Preprocessing:
    """Read a Hugging Face `preprocessor_config.json` (SigLIP/CLIP/ViT image processors) into Preprocessing.

    Tiles are square, so resize-shortest-edge + centre-crop to the same size equals a squash-resize; when
    the crop is smaller than the resize, the crop size is used (the whole tile is kept, not cropped).
    """
    source = str(cfg) if not isinstance(cfg, dict) else "processor config"
    if isinstance(cfg, dict):
        conf: dict[str, Any] = cfg
    else:
        try:
            conf = json.loads(Path(cfg).read_text())
        except (OSError, ValueError) as e:
            raise EncoderError(f"cannot read preprocessing from {source}: {e}") from e
    conf = conf.get("image_processor", conf)  # processor_config.json nests the image processor
    base = default or Preprocessing(size=224)
    try:
        size = None
        if conf.get("do_center_crop") and conf.get("crop_size") is not None:
            size = _size_from(conf["crop_size"])
        size = size or _size_from(conf.get("size")) or base.size
        resample = conf.get("resample", conf.get("interpolation"))
        if isinstance(resample, int):
            interpolation = _RESAMPLE_NAMES.get(resample, base.interpolation)
        else:
            interpolation = str(resample).lower() if resample else base.interpolation
        if interpolation not in _TORCH_MODES:
            interpolation = "bicubic"  # lanczos/box/hamming: bicubic is the nearest antialiased filter
        mean = rgb_triple(conf.get("image_mean", base.mean))
        std = rgb_triple(conf.get("image_std", base.std))
    except (TypeError, ValueError) as e:
        raise EncoderError(f"unusable image-processor settings in {source}: {e}") from e
    return Preprocessing(size=int(size), interpolation=interpolation, mean=mean, std=std, resize="squash")


def with_size(prep: Preprocessing, size: int | None) -> Preprocessing:
    """The same preprocessing at another input size (EncoderConfig.image_size)."""
    if size is None or size == prep.size:
        return prep
    return Preprocessing(size=size, interpolation=prep.interpolation, mean=prep.mean, std=prep.std, resize=prep.resize)
