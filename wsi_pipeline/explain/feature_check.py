"""Is the stored tile feature the vector the model's own image-text logits use? Checked on a few real tiles.

Stage 4 never encodes a tile again: it scores `logit_scale * cos(stored feature, text)`. That equals the model's
logits only if stage 2 stored the image vector the logits are computed from. For ConceptCLIP it is: the model's
forward returns `image_features` = `encode_image(pixels, normalize=True)[0]` (the SigLIP attention-pool output,
1152-d) and its zero-shot logits are `logit_scale.exp() * image_features @ text_features.T` (+ `logit_bias`, which a
softmax over concepts ignores); its `image_proj` MLP is applied to the patch tokens only (region-concept alignment),
never to the pooled vector. A checkpoint whose logits project the pooled output would break that silently, so:

    check = cohort_feature_check(results, encoder_cfg, slide_ids, embeddings)   # cached per (image, text) model
    check.require_aligned()                                                      # FeatureError on a mismatch

reads a few tiles of one slide exactly as stage 2 does (tile table, slide reader, the encoder's preprocessing),
runs the image model's forward (or `encode_image(..., normalize=True)` when the forward gives no image features),
and compares its logits against the concept embeddings with the logits from the stored features. The result
(`verified`, `mismatch` or `not checked`, the largest logit difference, tiles, reason) goes into every score store.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from .. import __version__
from ..encode.loader import SlideSource, TileBatchDataset
from ..encode.store import is_complete_store
from ..encoders import EncoderConfig, TileEncoder, build_encoder, preprocess_on_device
from ..errors import FeatureError, PipelineError
from ..io.jsonio import read_json, write_json_atomic
from ..io.zarr_access import attrs_dict, zarr_array
from ..layout import ResultsLayout
from ..tiling.geometry import geometry_from_attrs
from ..tiling.table import read_tile_table
from .similarity import check_same_model, tile_cosine
from .text_cache import KEY_CHARS, ConceptEmbeddings, text_model_key

log = logging.getLogger(__name__)

VERIFIED, MISMATCH, NOT_CHECKED = "verified", "mismatch", "not checked"
CHECK_TILES = 8
MAX_SLIDES = 3  # slides tried when one cannot be read again (moved since encoding)
# Largest cosine difference still "the same vector": fp16 storage moves a cosine by < 1e-3 (2^-11 relative per
# value); features computed under bf16/fp16 autocast (stage 2 on a GPU, or this check) differ from fp32 ones by
# ~1e-2, hence more room there. A wrong vector (a projection after pooling) moves cosines by ~0.1-1.
COS_TOL = 2e-3
COS_TOL_REDUCED_PRECISION = 5e-2


@dataclass
class FeatureCheck:
    """The outcome of `verify_feature_alignment`, as recorded in score stores (`feature_check` attribute)."""

    status: str  # verified | mismatch | not checked
    max_abs_logit_diff: float | None = None
    tiles: int = 0
    reason: str = ""
    slide_id: str | None = None
    max_abs_cos_diff: float | None = None  # stored-feature cosines vs the model's own
    tolerance: float | None = None  # on the logit difference
    method: str | None = None  # "forward" (the model's forward output) or "encode_image" (its normalised output)
    model_logit_scale: float | None = None
    text_logit_scale: float | None = None
    image_model: str | None = None  # keys of the two models (the cache file is named by them)
    text_model: str | None = None
    checked: str | None = None
    package_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureCheck:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def require_aligned(self) -> None:
        """One FeatureError line when the stored features are not what the text side expects."""
        if self.status == MISMATCH:
            raise FeatureError(f"feature check on slide {self.slide_id}: {self.reason}")


def image_model_key(provenance: dict[str, Any]) -> str:
    """A short hash naming the image model and its preprocessing (what makes a stored feature what it is)."""
    fields = {k: provenance.get(k) for k in ("encoder", "model_id", "revision", "weights_sha256", "preprocessing")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def check_cache_path(results: str | Path, encoder: str, image_key: str, text_key: str) -> Path:
    return ResultsLayout(results).text_cache_dir(encoder) / f"feature-check-{image_key}-{text_key}.json"


def cohort_feature_check(
    results: str | Path,
    encoder_cfg: EncoderConfig,
    slide_ids: Sequence[str],
    embeddings: ConceptEmbeddings,
    *,
    device: str | torch.device = "cpu",
    n_tiles: int = CHECK_TILES,
    force: bool = False,
    image_encoder: TileEncoder | None = None,
) -> FeatureCheck:
    """The feature check of a cohort, run once per (image model, text model): read from the text cache when this pair
    was verified before; otherwise run on the first slide (of `slide_ids`) whose store is complete, non-empty, written
    by the text tower's model and whose slide file is still readable. The image encoder is built only on a miss."""
    layout = ResultsLayout(results)
    candidates = []
    for sid in slide_ids:
        store = layout.feature_store(encoder_cfg.name, sid)
        if not is_complete_store(store):
            continue
        attrs = attrs_dict(zarr.open_group(str(store), mode="r"))
        try:
            check_same_model(attrs, embeddings.text_provenance, store)
        except FeatureError:
            continue  # scoring refuses this slide with that line; the check needs a store of the text's model
        if int(attrs.get("n_tiles") or 0) > 0:
            candidates.append((sid, attrs))
        if len(candidates) == MAX_SLIDES:
            break
    if not candidates:
        return FeatureCheck(NOT_CHECKED, reason="no complete, non-empty feature store of the text tower's model")
    keys = image_model_key(candidates[0][1].get("provenance") or {}), text_model_key(embeddings.text_provenance)
    cache = check_cache_path(results, encoder_cfg.name, *keys)
    if cache.is_file() and not force:
        try:
            return FeatureCheck.from_dict(read_json(cache))
        except (OSError, ValueError, TypeError) as e:  # a damaged entry is recomputed, never trusted
            log.warning("feature check cache %s is unreadable (%s); checking again", cache, e)
    enc = image_encoder or build_encoder(encoder_cfg, device)
    result = FeatureCheck(NOT_CHECKED, reason="no slide could be read")
    for sid, _ in candidates:  # a slide moved since encoding: try the next
        result = verify_feature_alignment(results, encoder_cfg.name, sid, enc, embeddings, n_tiles=n_tiles)
        if result.status != NOT_CHECKED:
            break
    if result.status == VERIFIED:  # only a pass is cached: a mismatch or a skipped check is looked at again
        write_json_atomic(cache, result.to_dict())
    return result


def verify_feature_alignment(
    results: str | Path,
    encoder_name: str,
    slide_id: str,
    image_encoder: TileEncoder,
    embeddings: ConceptEmbeddings,
    *,
    n_tiles: int = CHECK_TILES,
) -> FeatureCheck:
    """Logits of `n_tiles` tiles of one slide from their stored features (`logit_scale * cos(stored, text)`) against
    the image model's own logits for the same tiles, read from the slide as stage 2 reads them."""
    layout = ResultsLayout(results)
    store = layout.feature_store(encoder_name, slide_id)
    base = FeatureCheck(NOT_CHECKED, slide_id=slide_id, text_model=text_model_key(embeddings.text_provenance))
    base.checked, base.package_version = time.strftime("%Y-%m-%dT%H:%M:%S%z"), __version__
    module = getattr(image_encoder, "module", None)
    if not isinstance(module, torch.nn.Module) or image_encoder.preprocessing is None:
        base.reason = f"encoder {image_encoder.name!r} has no learned model with image-text logits to compare with"
        return base
    if not is_complete_store(store):
        base.reason = f"{store}: no complete feature store"
        return base
    group = zarr.open_group(str(store), mode="r", zarr_format=3)
    attrs = attrs_dict(group)
    base.image_model = image_model_key(attrs.get("provenance") or {})
    try:
        stored, tiles = _stored_and_tiles(layout, slide_id, group, n_tiles)
    except PipelineError as err:  # slide moved or replaced since encoding: nothing to compare with
        base.reason = f"tiles of slide {slide_id} cannot be read again: {err}"
        return base
    base.tiles = len(stored)
    with torch.inference_mode():
        pixels = preprocess_on_device(tiles.to(image_encoder.device), image_encoder.preprocessing)
        fresh = image_encoder.encode_uint8(tiles.to(image_encoder.device)).float().cpu().numpy()
        dtype = getattr(image_encoder, "autocast_dtype", None)
        with torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype is not None):
            side = model_image_side(module, pixels)
    if side is None:
        base.reason = f"{type(module).__name__} gives no image features for its logits (no forward, no encode_image)"
        return base
    reduced = dtype is not None or (attrs.get("provenance") or {}).get("precision") in ("bf16", "fp16")
    return _compare(base, stored, fresh, side, embeddings, tol=COS_TOL_REDUCED_PRECISION if reduced else COS_TOL)


def _stored_and_tiles(
    layout: ResultsLayout, slide_id: str, group: zarr.Group, n_tiles: int
) -> tuple[np.ndarray, torch.Tensor]:
    """Stored features of `n_tiles` rows spread over the slide, and those tiles read as stage 2 reads them."""
    table = read_tile_table(layout.tile_store(slide_id))
    feats = zarr_array(group, "features")
    n = feats.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n_tiles, n)).round().astype(np.int64))
    coords = np.asarray(zarr_array(group, "coords").oindex[rows, :])
    if len(table) != n or not np.array_equal(table.coords[rows], coords):
        raise FeatureError(f"{layout.tile_store(slide_id)}: tile table no longer matches the feature store's rows")
    source = SlideSource.from_tile_attrs(table.attrs)
    source.check_unchanged()
    ds = TileBatchDataset(source, geometry_from_attrs(table.attrs), coords, batch_size=len(rows))
    try:
        tiles, _, error = ds[0]
    finally:
        ds.close()
    if error:
        raise FeatureError(error)
    return np.asarray(feats.oindex[rows, :], dtype=np.float32), tiles


@dataclass
class ModelSide:
    features: np.ndarray  # (B, D) float32, unit rows: the image vectors the model's logits use
    logit_scale: float | None
    logit_bias: float | None
    method: str


def model_image_side(module: torch.nn.Module, pixels: torch.Tensor) -> ModelSide | None:
    """The image side of the model's own logits: its forward's `image_features`/`image_embeds` (ConceptCLIP, CLIP
    dicts; open_clip's tuple) with the forward's `logit_scale`/`logit_bias`, else `encode_image(normalize=True)`."""
    out, method = None, "forward"
    params = inspect.signature(module.forward).parameters
    name = "pixel_values" if "pixel_values" in params else "image" if "image" in params else None
    if name is not None:
        try:
            out = module(**{name: pixels})
        except Exception as e:  # remote code may insist on text inputs too; encode_image is the fallback
            log.info("%s.forward(%s=...) failed (%s); comparing with encode_image", type(module).__name__, name, e)
    feats, scale, bias = _unpack(out)
    if feats is None:
        encode = getattr(module, "encode_image", None)
        if not callable(encode):
            return None
        enc_params = inspect.signature(encode).parameters
        feats, _, _ = _unpack(encode(pixels, normalize=True) if "normalize" in enc_params else encode(pixels))
        method, scale, bias = "encode_image", None, None
    if feats is None:
        return None
    return ModelSide(F.normalize(feats.float(), dim=-1).cpu().numpy(), scale, bias, method)


def _scalar(value: Any) -> float | None:
    return float(value.detach().float()) if isinstance(value, torch.Tensor) and value.numel() == 1 else None


def _unpack(out: Any) -> tuple[torch.Tensor | None, float | None, float | None]:
    """(image features, logit scale, logit bias) from a dict/ModelOutput, an open_clip tuple or a bare tensor."""
    if isinstance(out, torch.Tensor):
        return out, None, None
    if isinstance(out, (tuple, list)):
        feats = out[0] if out and isinstance(out[0], torch.Tensor) and out[0].ndim == 2 else None
        return feats, _scalar(out[2]) if len(out) > 2 else None, _scalar(out[3]) if len(out) > 3 else None
    if out is None or not hasattr(out, "get"):
        return None, None, None
    feats = next((out.get(k) for k in ("image_features", "image_embeds") if out.get(k) is not None), None)
    return feats, _scalar(out.get("logit_scale")), _scalar(out.get("logit_bias"))


def _compare(
    check: FeatureCheck,
    stored: np.ndarray,
    fresh: np.ndarray,
    side: ModelSide,
    emb: ConceptEmbeddings,
    tol: float,
) -> FeatureCheck:
    check.method, check.text_logit_scale = side.method, emb.logit_scale
    if side.features.shape[1] != emb.dim or stored.shape[1] != emb.dim:
        check.status = MISMATCH
        check.reason = (
            f"the model's logits use {side.features.shape[1]}-d image features, the stored ones are "
            f"{stored.shape[1]}-d and the text embeddings {emb.dim}-d; stage 2 must store the vector the logits use"
        )
        return check
    text = emb.embeddings.astype(np.float32)
    cos_stored, cos_fresh = tile_cosine(stored, text), tile_cosine(fresh, text)
    cos_model = side.features @ text.T
    scale = side.logit_scale if side.logit_scale is not None else emb.logit_scale
    bias = side.logit_bias if side.logit_bias is not None else (emb.logit_bias or 0.0)
    ours = emb.logit_scale * cos_stored + (emb.logit_bias or 0.0)
    theirs = scale * cos_model + bias
    check.model_logit_scale = float(scale)
    check.max_abs_logit_diff = float(np.abs(ours - theirs).max())
    check.max_abs_cos_diff = float(np.abs(cos_stored - cos_model).max())
    check.tolerance = float(max(scale, emb.logit_scale) * tol)
    if check.max_abs_logit_diff <= check.tolerance:
        check.status = VERIFIED
        return check
    check.status = MISMATCH
    fresh_vs_model = float(np.abs(cos_fresh - cos_model).max())
    stored_vs_fresh = float(np.abs(cos_stored - cos_fresh).max())
    if fresh_vs_model > tol:
        check.reason = (
            f"the model's image-text logits ({side.method}) use another image vector than the one stage 2 stores "
            f"(cosines differ by up to {fresh_vs_model:.3g} on {check.tiles} tiles), e.g. a projection applied after "
            "the pooled output; the stored features are not what the text side expects: store the vector the "
            "logits use (the encoder's forward function) and re-encode"
        )
    elif stored_vs_fresh > tol:
        check.reason = (
            f"the stored features differ from what the encoder computes for the same tiles now (cosines differ by up "
            f"to {stored_vs_fresh:.3g}); re-encode the cohort (wsi-pipeline encode --force)"
        )
    else:
        check.reason = (
            f"the text tower's logit_scale {emb.logit_scale:.6g} (bias {emb.logit_bias}) is not the model's "
            f"{scale:.6g} (bias {side.logit_bias}): logits differ by up to {check.max_abs_logit_diff:.3g}; "
            "embed the concepts with the image model's own text tower"
        )
    return check
