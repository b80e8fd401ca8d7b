"""Mean- and max-pooling baselines."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_model
from .layers import NEG, as_batch, instance_encoder


class PoolMIL(nn.Module):
    """Mean- or max-pooling baseline; its 'attention' is the share each instance has in the pooled vector."""

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 128,
        dropout: float = 0.25,
        mode: str = "mean",
        encoder_layers: int = 1,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.encoder = instance_encoder(in_dim, hidden_dim, encoder_layers, dropout)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        x, mask = as_batch(x, mask)
        h = self.encoder(x)
        m = mask.unsqueeze(-1)
        if self.mode == "mean":
            count = m.sum(1).clamp(min=1)
            pooled = (h * m).sum(1) / count
            weights = mask / count
        else:
            pooled, idx = h.masked_fill(~m, NEG).max(dim=1)  # B,H
            # share of hidden units for which each instance is the maximum
            weights = _argmax_share(idx, h.shape[1])
        logits = self.head(pooled)
        return (logits, weights.to(h.dtype)) if return_attention else logits


def _argmax_share(idx: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.zeros(idx.shape[0], n, device=idx.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))
    return counts / idx.shape[1]


@register_model("mean", "max")
def build_pool(spec: dict[str, Any]) -> nn.Module:
    return PoolMIL(
        int(spec["in_dim"]),
        int(spec["n_out"]),
        int(spec.get("hidden_dim", 128)),
        float(spec.get("dropout", 0.25)),
        mode=spec["model"],
        encoder_layers=int(spec.get("encoder_layers", 1)),
    )
