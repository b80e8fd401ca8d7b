"""The encoder contract: the TileEncoder base classes, weight checksums and provenance."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.encoders.config import (  # re-exported: the encoder contract in one import
    EncoderConfig,
    Preprocessing,
)
from wsi_pipeline.encoders.preprocess import preprocess_on_device
from wsi_pipeline.errors import EncoderError, FeatureError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _sha256_file(path: Path) -> str:
    # Files in the Hugging Face cache are symlinks to blobs named by their sha256 (LFS files): use the name.
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, cached per (real path, size, mtime) so rebuilding an encoder does not rehash GBs."""
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _sha256_file(Path(path))
    return _SHA_CACHE[key]


def weight_files(path: str | Path) -> list[Path]:
    """Weight files of a model directory (top level, sorted), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def weights_digest(files: Iterable[Path]) -> dict[str, Any]:
    """Per-file sha256 plus one combined digest over (name, sha) pairs, independent of the directory."""
    per_file = {f.name: sha256_file(f) for f in files}
    combined = hashlib.sha256("".join(f"{n}:{s};" for n, s in sorted(per_file.items())).encode()).hexdigest()
    return {"files": per_file, "sha256": combined if per_file else None}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    import wsi_pipeline

    out = {"wsi_pipeline": wsi_pipeline.__version__, "torch": torch.__version__, "numpy": numpy.__version__}
    # Distribution metadata, not imports: importing transformers/open_clip just for a version costs seconds.
    for key, dist in (
        ("transformers", "transformers"),
        ("timm", "timm"),
        ("open_clip", "open_clip_torch"),
        ("skimage", "scikit-image"),
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[key] = version(dist)
    return out


def check_finite(emb: torch.Tensor, context: str) -> None:
    """Raise FeatureError (one line) if any embedding value is NaN or infinite."""
    finite = torch.isfinite(emb)
    if bool(finite.all()):
        return
    bad_rows = (~finite.reshape(finite.shape[0], -1).all(dim=1)).nonzero().flatten().tolist() if emb.ndim else []
    shown = ", ".join(str(i) for i in bad_rows[:10]) + (" ..." if len(bad_rows) > 10 else "")
    raise FeatureError(
        f"{context}: {len(bad_rows)} of {emb.shape[0] if emb.ndim else 1} embeddings contain NaN/inf "
        f"(rows {shown}); try precision fp32 (encoder.precision) and check the tiles and the model weights."
    )


class TileEncoder(abc.ABC):
    """A tile encoder: uint8 RGB tiles in, one float32 vector per tile out."""

    name: str
    embed_dim: int
    preprocessing: Preprocessing | None
    device: torch.device

    def __init__(self) -> None:
        self._provenance_extra: dict[str, Any] = {}

    @abc.abstractmethod
    def encode_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles: (B, H, W, 3) uint8 (H == W, any size) -> (B, embed_dim) float32 on self.device."""

    def _provenance_core(self) -> dict[str, Any]:
        return {}

    def provenance(self) -> dict[str, Any]:
        """What produced the embeddings: encoder, source, revision, weights checksum, preprocessing, versions."""
        out: dict[str, Any] = {
            "encoder": self.name,
            "embed_dim": self.embed_dim,
            "model_id": None,
            "path": None,
            "revision": None,
            "weights_sha256": None,
            "weight_files": {},
            "random_weights": False,
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None,
        }
        out.update(self._provenance_core())
        out.update(self._provenance_extra)
        out["library_versions"] = library_versions()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, embed_dim={self.embed_dim}, device={self.device})"


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSource:
    """Where a learned encoder's weights came from (for provenance)."""

    model_id: str | None = None
    path: str | None = None
    revision: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    random_weights: bool = False


class TorchTileEncoder(TileEncoder):
    """A learned encoder: device preprocessing, then `forward_fn(pixels) -> (B, D)` under autocast on CUDA."""

    preprocessing: Preprocessing  # always set: a learned encoder has the model's preprocessing

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        forward_fn: Any,
        embed_dim: int | None,
        preprocessing: Preprocessing,
        source: ModelSource,
        cfg: EncoderConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.name = name
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.precision = cfg.precision
        self.source = source
        self.module = module.to(self.device).eval()
        self._forward_fn = forward_fn
        self._weights: dict[str, Any] | None = None
        # Remote-code configs vary: when the width is unknown, read it from one forward pass on the device.
        self.embed_dim = int(embed_dim) if embed_dim is not None else self._probe_dim()
        self.compiled = cfg.compile
        # Compile the forward function, not the module: the module keeps its state-dict names (after the probe,
        # so compilation sees real batch shapes).
        if cfg.compile:
            self._forward_fn = torch.compile(forward_fn)

    def _probe_dim(self) -> int:
        out = self.encode_pixels(torch.zeros(1, 3, self.preprocessing.size, self.preprocessing.size))
        if out.ndim != 2:
            raise EncoderError(f"encoder {self.name!r} returns shape {tuple(out.shape)}; expected (batch, dim)")
        return int(out.shape[1])

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        # Reduced precision only on CUDA: on CPU bf16 autocast is slow and changes numbers for no gain.
        return _AUTOCAST.get(self.precision) if self.device.type == "cuda" else None

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Already preprocessed (B, 3, S, S) float pixels -> (B, embed_dim) float32."""
        pixels = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self._forward_fn(pixels)
        return out.float()

    @torch.inference_mode()
    def encode_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.device != self.device:
            tiles = tiles.to(self.device, non_blocking=True)
        return self.encode_pixels(preprocess_on_device(tiles, self.preprocessing, torch.float32))

    def weights_info(self) -> dict[str, Any]:
        if self._weights is None:  # hashing is lazy and done once per encoder
            self._weights = weights_digest(self.source.weight_files)
        return self._weights

    def _provenance_core(self) -> dict[str, Any]:
        w = self.weights_info()
        return {
            "model_id": self.source.model_id,
            "path": os.fspath(self.source.path) if self.source.path else None,
            "revision": self.source.revision,
            "weights_sha256": w["sha256"],
            "weight_files": w["files"],
            "random_weights": self.source.random_weights,
            "precision": self.precision if self.device.type == "cuda" else "fp32",
            "compiled": self.compiled,
            "device": str(self.device),
        }
