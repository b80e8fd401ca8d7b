"""Pieces every MIL model shares: batching a bag with its padding mask, the per-instance MLP encoder."""

from __future__ import annotations

import torch
from torch import nn

NEG = -1e4  # fits float16 under autocast, still ~0 after softmax


def as_batch(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    elif mask.dim() == 1:
        mask = mask.unsqueeze(0)
    return x, mask


def instance_encoder(in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        mods += [nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout)]
        dim = hidden
    return nn.Sequential(*mods)
