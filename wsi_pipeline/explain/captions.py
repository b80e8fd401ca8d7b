"""Captions for the top-attention tiles of a slide, from a transformers VisionEncoderDecoder captioner.

    captioner = build_captioner(explain_cfg.captioner, device="cuda")
    texts = caption_slide_tiles(captioner, layout.tile_store(slide_id), top_coords)

The model folder is found like the image encoders' (`encoders.hub.resolve_model_dir`): a local `path` wins, else a
pinned snapshot in the Hugging Face cache, offline unless `local_files_only: false`, and a checkpoint that ships
its own code loads only with `trust_remote_code: true`. Decoding is deterministic (greedy or beam search, never
sampling), so the same tiles and weights give the same captions on every run. Tiles are read exactly as stage 2
reads them (`encode.loader.TileBatchDataset`), so a caption describes the pixels the encoder saw.

torch and transformers are imported inside the functions: importing this module must stay cheap for light commands.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, EncoderError, SlideError, first_line
from .config import CaptionerConfig

if TYPE_CHECKING:
    import torch

WHAT = "explain.captioner"
# OpenAI CLIP normalisation: the reference captioners use a CLIP ViT image encoder.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Any one of these makes a folder's tokenizer loadable (fast tokenizer, GPT-2 BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
DEFAULT_BATCH_SIZE = 8


class _NoPixelMaskWarning(logging.Filter):
    """transformers warns that a batch has no attention mask when pad == eos (GPT-2 captioners): pixel inputs
    have no padding to mask, so the warning is noise in every explain log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention mask" not in record.getMessage()


def _quiet_generation_warnings() -> None:
    gen_log = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, _NoPixelMaskWarning) for f in gen_log.filters):
        gen_log.addFilter(_NoPixelMaskWarning())


def _hint(cfg: CaptionerConfig) -> str:
    local = "set explain.captioner.path to a local folder holding a VisionEncoderDecoder captioning model"
    if cfg.path is not None or not cfg.model_id:
        return local
    rev = f" --revision {cfg.revision}" if cfg.revision else ""
    return (
        f"run `hf download {cfg.model_id}{rev}` (if the repo is gated, accept its terms on "
        f"https://huggingface.co/{cfg.model_id} and log in first), or set explain.captioner.local_files_only: false "
        f"to download at run time, or {local}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EncoderError(f"{WHAT}: {path} is not readable JSON ({first_line(e)}); re-download the model") from e
    return data if isinstance(data, dict) else {}


def _check_model_folder(model_dir: Path, cfg: CaptionerConfig, hint: str) -> dict[str, Any]:
    """config.json of a VisionEncoderDecoder whose remote code (if any) is allowed, and a tokenizer; one line if not."""
    if not model_dir.is_dir():
        raise EncoderError(f"{WHAT}: {model_dir} is a file; point explain.captioner.path at the model's folder")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EncoderError(f"{WHAT}: {cfg_path} is missing, so {model_dir} is not a model folder; {hint}")
    config = _read_json(cfg_path)
    model_type = config.get("model_type")
    if model_type != "vision-encoder-decoder":
        raise EncoderError(
            f"{WHAT}: {model_dir} holds a {model_type or 'untyped'} model, not a VisionEncoderDecoder (image encoder "
            "+ text decoder); point explain.captioner at an image-captioning checkpoint"
        )
    # Remote code can hide in the model config, its encoder/decoder sub-configs, the tokenizer or the processor.
    found = [config, config.get("encoder") or {}, config.get("decoder") or {}]
    extra = [model_dir / n for n in ("tokenizer_config.json", *PROCESSOR_FILES)]
    found += [_read_json(p) for p in extra if p.is_file()]
    code = sorted({str(v).split(".")[0] + ".py" for c in found for v in (c.get("auto_map") or {}).values()})
    if code and not cfg.trust_remote_code:
        raise EncoderError(
            f"{WHAT}: {model_dir} runs its own Python code ({', '.join(code)}); loading it needs "
            "explain.captioner.trust_remote_code: true, which you should set only for a source you trust"
        )
    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise EncoderError(
            f"{WHAT}: {model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); save the "
            "captioner's tokenizer there (tokenizer.save_pretrained(folder)) or download the whole model repo"
        )
    return config


def _resolve(cfg: CaptionerConfig) -> tuple[Path, str | None]:
    from ..encoders.hub import resolve_model_dir

    hint = _hint(cfg)
    if cfg.path is not None and not Path(cfg.path).expanduser().exists():
        raise EncoderError(f"{WHAT}: path {Path(cfg.path).expanduser()} does not exist; {hint}")
    return resolve_model_dir(
        path=cfg.path,
        repo_id=cfg.model_id if cfg.path is None else None,
        revision=cfg.revision,
        cache_dir=cfg.cache_dir,
        local_files_only=cfg.local_files_only,
        what=WHAT,
        hint=hint,
    )


def _first_id(*candidates: Any) -> int | None:
    """The first token id given (an eos may be a list: its first entry)."""
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None


def _token_ids(model: Any, tokenizer: Any, model_dir: Path) -> dict[str, Any]:
    """decoder start / eos / pad ids: the checkpoint's generation config, then its configs, then the tokenizer.

    GPT-2 captioners often save none of them on the VisionEncoderDecoder config: the decoder's bos starts a caption
    (the tokenizer's CLS for BERT-style decoders) and eos pads, as those models were trained.
    """
    gen, dec = model.generation_config, model.config.decoder
    eos = gen.eos_token_id
    if eos is None:
        eos = _first_id(getattr(dec, "eos_token_id", None), tokenizer.eos_token_id, tokenizer.sep_token_id)
    start = _first_id(
        gen.decoder_start_token_id,
        getattr(model.config, "decoder_start_token_id", None),
        gen.bos_token_id,
        getattr(dec, "bos_token_id", None),
        tokenizer.bos_token_id,
        tokenizer.cls_token_id,
    )
    pad = _first_id(gen.pad_token_id, getattr(model.config, "pad_token_id", None), getattr(dec, "pad_token_id", None))
    pad = pad if pad is not None else _first_id(tokenizer.pad_token_id, eos)
    vocab = int(getattr(dec, "vocab_size", 0) or 0)
    if start is None:
        raise EncoderError(
            f"{WHAT}: {model_dir} names no token to start a caption (decoder_start_token_id, bos_token_id or the "
            "tokenizer's bos/cls token); set decoder_start_token_id in its generation_config.json"
        )
    if vocab and not 0 <= start < vocab:
        raise EncoderError(
            f"{WHAT}: the caption start token {start} is outside the decoder's vocabulary of {vocab} in {model_dir}; "
            "the tokenizer does not belong to this decoder: save the model's own tokenizer there"
        )
    return {"decoder_start_token_id": start, "eos_token_id": eos, "pad_token_id": pad}


def _check_length(model: Any, cfg: CaptionerConfig, model_dir: Path) -> None:
    # A decoder with learned positions (GPT-2) fails mid-generation past its last position: say so up front.
    dec = model.config.decoder
    positions = getattr(dec, "max_position_embeddings", None) or getattr(dec, "n_positions", None)
    if isinstance(positions, int) and cfg.max_new_tokens >= positions:
        raise ConfigError(
            f"explain.captioner.max_new_tokens is {cfg.max_new_tokens} but the decoder in {model_dir} has "
            f"{positions} positions (one is the start token); set max_new_tokens to at most {positions - 1}"
        )


@dataclass
class Captioner:
    """A loaded captioner: `caption(tiles)` -> one string per uint8 (H, W, 3) RGB tile."""

    model: Any  # transformers VisionEncoderDecoderModel, in eval mode on `device`
    tokenizer: Any
    image_processor: Any  # called as image_processor(images=[...], return_tensors="pt")
    device: torch.device
    cfg: CaptionerConfig
    model_dir: Path
    revision: str | None
    token_ids: dict[str, Any]
    batch_size: int = DEFAULT_BATCH_SIZE
    info: dict[str, Any] = field(default_factory=dict)
    _weights: dict[str, Any] | None = None

    def _pixels(self, tiles: list[np.ndarray]) -> torch.Tensor:
        batch = self.image_processor(images=tiles, return_tensors="pt", input_data_format="channels_last")
        return batch["pixel_values"].to(self.device)

    def caption(self, tiles: list[np.ndarray]) -> list[str]:
        """One caption per tile, in order; whitespace collapsed so each caption is one line."""
        import torch

        for i, t in enumerate(tiles):
            if t.dtype != np.uint8 or t.ndim != 3 or t.shape[2] != 3:
                raise ValueError(f"tile {i}: expected uint8 (H, W, 3) RGB, got {t.dtype} {tuple(t.shape)}")
        out: list[str] = []
        for lo in range(0, len(tiles), self.batch_size):
            pixels = self._pixels([np.ascontiguousarray(t) for t in tiles[lo : lo + self.batch_size]])
            with torch.inference_mode():
                ids = self.model.generate(
                    pixel_values=pixels,
                    max_new_tokens=self.cfg.max_new_tokens,
                    num_beams=self.cfg.num_beams,
                    do_sample=False,  # reproducible captions, whatever the checkpoint's generation_config says
                    **self.token_ids,
                )
            texts = self.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
            out += [" ".join(t.split()) for t in texts]
        return out

    def provenance(self) -> dict[str, Any]:
        """What produced the captions: model source, revision, weights checksum, decoding settings, versions."""
        from ..encoders.base import library_versions, weight_files, weights_digest

        if self._weights is None:  # hashing is lazy and done once per captioner
            self._weights = weights_digest(weight_files(self.model_dir))
        return {
            "model_id": self.cfg.model_id,
            "path": str(self.model_dir),
            "revision": self.revision,
            "weights_sha256": self._weights["sha256"],
            "weight_files": self._weights["files"],
            "trust_remote_code": self.cfg.trust_remote_code,
            "max_new_tokens": self.cfg.max_new_tokens,
            "num_beams": self.cfg.num_beams,
            "decoding": "beam search" if self.cfg.num_beams > 1 else "greedy",
            **self.token_ids,
            **self.info,
            "device": str(self.device),
            "library_versions": library_versions(),
        }


def _image_processor(model: Any, model_dir: Path, cfg: CaptionerConfig) -> tuple[Any, dict[str, Any]]:
    """The checkpoint's own image processor, or CLIP normalisation at the encoder's input size when none is saved."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if any((model_dir / n).is_file() for n in PROCESSOR_FILES):
        try:
            proc = AutoImageProcessor.from_pretrained(
                str(model_dir), local_files_only=True, trust_remote_code=cfg.trust_remote_code
            )
        except Exception as e:  # transformers raises many types; the user needs one line either way
            raise EncoderError(
                f"{WHAT}: cannot load the image processor in {model_dir} ({type(e).__name__}: {first_line(e)}); "
                "fix or delete its preprocessor_config.json (CLIP normalisation is used without one)"
            ) from e
        return proc, {"image_processor": type(proc).__name__, "image_processor_source": "preprocessor_config.json"}
    size = getattr(model.config.encoder, "image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    proc = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    source = f"default: no preprocessor_config.json, CLIP mean/std at the encoder's image size {size}"
    return proc, {"image_processor": type(proc).__name__, "image_processor_source": source}


def build_captioner(
    cfg: CaptionerConfig, device: torch.device | str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE
) -> Captioner:
    """Load the captioner `cfg` names (offline by default); one-line `EncoderError` for anything unusable."""
    import torch

    model_dir, revision = _resolve(cfg)
    config = _check_model_folder(model_dir, cfg, _hint(cfg))

    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    model: Any  # transformers' typing of .to() on a loaded model confuses mypy
    try:
        model = VisionEncoderDecoderModel.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as e:  # transformers raises many types; the user needs one line either way
        raise EncoderError(
            f"{WHAT}: cannot load a VisionEncoderDecoderModel from {model_dir} ({type(e).__name__}: {first_line(e)})"
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as e:
        raise EncoderError(
            f"{WHAT}: cannot load the tokenizer in {model_dir} ({type(e).__name__}: {first_line(e)}); save the "
            "captioner's own tokenizer there (tokenizer.save_pretrained(folder))"
        ) from e
    processor, info = _image_processor(model, model_dir, cfg)
    token_ids = _token_ids(model, tokenizer, model_dir)
    _check_length(model, cfg, model_dir)
    info.update(
        {
            "model_class": type(model).__name__,
            "encoder_type": (config.get("encoder") or {}).get("model_type"),
            "decoder_type": (config.get("decoder") or {}).get("model_type"),
            "tokenizer": type(tokenizer).__name__,
        }
    )
    _quiet_generation_warnings()
    dev = torch.device(device)
    return Captioner(
        model=model.to(dev).eval(),
        tokenizer=tokenizer,
        image_processor=processor,
        device=dev,
        cfg=cfg,
        model_dir=model_dir,
        revision=revision,
        token_ids=token_ids,
        batch_size=max(1, int(batch_size)),
        info=info,
    )


def caption_slide_tiles(captioner: Captioner, tile_store: Path, coords: np.ndarray) -> list[str]:
    """Caption the tiles at level-0 `coords` (N, 2) of the slide behind `tile_store`, read as stage 2 reads them."""
    from ..encode.loader import SlideSource, TileBatchDataset
    from ..tiling.geometry import geometry_from_attrs
    from ..tiling.table import read_tile_attrs

    xy = np.asarray(coords, dtype=np.int64)
    if xy.size == 0:
        return []
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2) level-0 x, y; got shape {tuple(xy.shape)}")
    attrs = read_tile_attrs(tile_store)
    if attrs is None:
        raise SlideError(f"{tile_store}: no tile store here; run `wsi-pipeline tile` for this slide first")
    source = SlideSource.from_tile_attrs(attrs)
    source.check_unchanged()  # a replaced slide would be captioned at meaningless coordinates
    dataset = TileBatchDataset(source, geometry_from_attrs(attrs), xy, captioner.batch_size)
    captions: list[str] = []
    try:
        for i in range(len(dataset)):
            tiles, _, error = dataset[i]
            if error:
                raise SlideError(error)
            captions += captioner.caption(list(tiles.numpy()))
    finally:
        dataset.close()
    return captions
