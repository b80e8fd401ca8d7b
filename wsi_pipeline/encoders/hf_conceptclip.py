"""ConceptCLIP through transformers' AutoModel (remote code), pinned revision, offline by default.

The checkpoint ships its own modeling code (`config.json` -> `auto_map`); its model exposes
`encode_image(pixel_values, normalize=False)` returning a tuple whose first element is the pooled image
embedding (1152-d for the SigLIP so400m/14 vision tower at 384 px). Its processor is SigLIP-style: squash-resize
to 384, bicubic, mean = std = 0.5, which `preprocessor_config.json` states and we read when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.encoders.base import ModelSource, TorchTileEncoder, weight_files
from wsi_pipeline.encoders.config import CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION, EncoderConfig, Preprocessing
from wsi_pipeline.encoders.hub import download_hint, resolve_model_dir
from wsi_pipeline.encoders.preprocess import preprocessing_from_processor_config, with_size
from wsi_pipeline.errors import EncoderError, first_line

CONCEPTCLIP_PREPROCESSING = Preprocessing(size=384, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def _read_config(model_dir: Path, what: str, hint: str) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EncoderError(f"{what}: {cfg_path} is missing, so {model_dir} is not a model directory; {hint}")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as e:
        raise EncoderError(f"{what}: {cfg_path} is not valid JSON ({e}); re-download the model") from e


def _pooled(out: Any) -> torch.Tensor:
    # The contract is a tuple (pooled, tokens); accept a bare tensor or a model output with pooler_output too.
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "pooler_output", "image_features"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    raise EncoderError(f"encode_image returned {type(out).__name__}; expected a tuple whose first item is pooled")


def resolve_conceptclip_dir(cfg: EncoderConfig, what: str) -> tuple[Path, str | None, str, str | None]:
    """(checkpoint folder, revision, download hint, hub id): `encoder.path`, or the pinned ConceptCLIP revision (or
    `model_id`/`revision`) from the HF cache, offline unless asked. Image and text towers resolve through here."""
    repo_id = cfg.model_id or (None if cfg.path else CONCEPTCLIP_REPO)
    revision = cfg.revision or (CONCEPTCLIP_REVISION if repo_id == CONCEPTCLIP_REPO else None)
    hint = download_hint(repo_id or CONCEPTCLIP_REPO, revision or CONCEPTCLIP_REVISION)
    model_dir, revision = resolve_model_dir(
        path=cfg.path,
        repo_id=repo_id,
        revision=revision,
        cache_dir=cfg.cache_dir,
        local_files_only=cfg.local_files_only,
        what=what,
        hint=hint,
    )
    return model_dir, revision, hint, repo_id


def check_remote_code(model_dir: Path, cfg: EncoderConfig, what: str, hint: str, revision: str | None) -> None:
    """One EncoderError line when the checkpoint ships its own code (`auto_map`) and the config has not allowed it
    (encoder.trust_remote_code); the image and the text tower load through here."""
    auto_map = _read_config(model_dir, what, hint).get("auto_map") or {}
    if auto_map and not cfg.trust_remote_code:
        code = sorted({str(v).split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)})
        raise EncoderError(
            f"{what}: {model_dir} runs its own Python code ({', '.join(code) or 'auto_map'}); loading it needs "
            f"encoder.trust_remote_code: true in the config, which you should set only for a source you trust "
            f"(revision {revision or 'unpinned'})"
        )


def build_conceptclip(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTileEncoder:
    what = f"encoder {cfg.name!r}"
    model_dir, revision, hint, repo_id = resolve_conceptclip_dir(cfg, what)
    check_remote_code(model_dir, cfg, what, hint, revision)

    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(
            str(model_dir), trust_remote_code=cfg.trust_remote_code, local_files_only=True
        )
    except Exception as e:  # transformers raises many types; the user needs one line either way
        first = first_line(e)
        raise EncoderError(f"{what}: cannot load the model in {model_dir} ({type(e).__name__}: {first})") from e
    if not callable(getattr(model, "encode_image", None)):
        raise EncoderError(
            f"{what}: {type(model).__name__} from {model_dir} has no encode_image(); is this a ConceptCLIP checkpoint?"
        )

    proc = model_dir / "preprocessor_config.json"
    prep = (
        preprocessing_from_processor_config(proc, CONCEPTCLIP_PREPROCESSING)
        if proc.is_file()
        else (CONCEPTCLIP_PREPROCESSING)
    )
    prep = with_size(prep, cfg.image_size)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(model.encode_image(pixels, normalize=False))

    source = ModelSource(model_id=repo_id, path=str(model_dir), revision=revision, weight_files=weight_files(model_dir))
    enc = TorchTileEncoder(cfg.name, model, forward, None, prep, source, cfg, device)
    enc._provenance_extra["trust_remote_code"] = cfg.trust_remote_code
    enc._provenance_extra["model_class"] = type(model).__name__
    return enc
