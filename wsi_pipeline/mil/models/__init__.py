"""MIL models by name. Every model takes `x` as (N, D) for one bag or (B, N, D) padded with a boolean `mask` (B, N)
(True = real instance) and returns logits (B, n_out); `return_attention=True` also returns per-instance scores
(B, N) that sum to 1 over the real instances of each bag (0 on padding).

Adding a model is one file in this folder: a `torch.nn.Module` and a builder decorated with
`@register_model("name")` that makes it from a spec dict (`model`, `in_dim`, `n_out`, the `mil.train` settings
and `mil.train.model_args`). Every module here is imported on first use of the registry, so the file is all.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

Builder = Callable[[dict[str, Any]], "nn.Module"]
_REGISTRY: dict[str, Builder] = {}
_HERE = Path(__file__).parent
_DECORATOR = re.compile(r"@register_model\(([^)]*)\)")


def register_model(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: `@register_model("abmil", "abmil-gated")` over `def build(spec) -> nn.Module`."""

    def add(builder: Builder) -> Builder:
        for name in names:
            _REGISTRY[name] = builder
        return builder

    return add


def _import_all() -> None:
    for info in pkgutil.iter_modules([str(_HERE)]):
        importlib.import_module(f"{__name__}.{info.name}")


def model_names() -> list[str]:
    """Every model name, without importing torch: read from the decorators in this folder (for validating a
    config in a job that never trains), plus any registered at run time from outside the package."""
    names = set(_REGISTRY)
    for path in _HERE.glob("*.py"):
        for args in _DECORATOR.findall(path.read_text()):
            names.update(re.findall(r"[\"']([^\"']+)[\"']", args))
    return sorted(names)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build a model from its JSON spec (what checkpoints store): `model`, `in_dim`, `n_out`, hyper-parameters."""
    if spec["model"] not in _REGISTRY:
        _import_all()
    if spec["model"] not in _REGISTRY:
        raise ConfigError(
            f"unknown MIL model {spec['model']!r} (mil.train.model); available: {', '.join(model_names())}"
        )
    return _REGISTRY[spec["model"]](spec)
