"""The `encoder:` config section and the preprocessing description (pydantic and dataclasses only, no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pydantic

# ConceptCLIP on the Hugging Face Hub, pinned so embeddings stay comparable across runs and sites.
CONCEPTCLIP_REPO = "JerrryNie/ConceptCLIP"
CONCEPTCLIP_REVISION = "c91b537cd004630f1e262ef1975200070629a8a9"


class EncoderConfig(pydantic.BaseModel):
    """Which tile encoder to build and from where; the `encoder:` block of the pipeline config."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = "conceptclip"
    # Hub id ("org/name", for open_clip also "hf-hub:org/name"), or an architecture name (timm, open_clip).
    model_id: str | None = None
    # Local directory (or checkpoint file for timm/open_clip) holding the weights; wins over the hub.
    path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    local_files_only: bool = True  # no hub traffic at run time unless asked for
    cache_dir: str | None = None
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    compile: bool = False
    # Override the input size of the model's preprocessing (rarely needed; the model's config is the default).
    image_size: int | None = pydantic.Field(default=None, gt=0)


def rgb_triple(values: Iterable[Any]) -> tuple[float, float, float]:
    """Per-channel floats (a mean or a std) as an (R, G, B) tuple; ValueError unless there are exactly three."""
    v = [float(x) for x in values]
    if len(v) != 3:
        raise ValueError("image_mean/image_std must have 3 values")
    return v[0], v[1], v[2]


@dataclass
class Preprocessing:
    """How tiles become model input: squash-resize to `size` x `size`, scale to [0, 1], normalise."""

    size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "squash"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d
