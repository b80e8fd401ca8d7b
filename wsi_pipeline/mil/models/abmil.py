"""Attention-based deep MIL (Ilse et al. 2018), gated and ungated."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import register_model
from .layers import NEG, as_batch, instance_encoder


class ABMIL(nn.Module):
    """Attention-based deep MIL pooling (Ilse et al. 2018): a = softmax(w^T (tanh(V h) [* sigm(U h)]))."""

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 128,
        attn_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = True,
        encoder_layers: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = instance_encoder(in_dim, hidden_dim, encoder_layers, dropout)
        self.attn_v = nn.Linear(hidden_dim, attn_dim)
        self.attn_u = nn.Linear(hidden_dim, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        x, mask = as_batch(x, mask)
        h = self.encoder(x)  # B,N,H
        a = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        scores = self.attn_w(a).squeeze(-1).masked_fill(~mask, NEG)  # B,N
        weights = torch.softmax(scores.float(), dim=1).to(h.dtype) * mask
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)
        logits = self.head(pooled)
        return (logits, weights) if return_attention else logits


@register_model("abmil", "abmil-gated")
def build_abmil(spec: dict[str, Any]) -> nn.Module:
    return ABMIL(
        int(spec["in_dim"]),
        int(spec["n_out"]),
        int(spec.get("hidden_dim", 128)),
        int(spec.get("attn_dim", 128)),
        float(spec.get("dropout", 0.25)),
        gated=spec["model"] == "abmil-gated",
        encoder_layers=int(spec.get("encoder_layers", 1)),
    )
