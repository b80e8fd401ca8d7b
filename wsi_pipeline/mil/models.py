"""MIL aggregators over a bag of instance features: ABMIL (gated/ungated), a small TransMIL, mean/max pooling.

Every model takes `x` as (N, D) for one bag or (B, N, D) padded with a boolean `mask` (B, N) (True = real
instance) and returns logits (B, n_out); `return_attention=True` also returns per-instance scores (B, N) that
sum to 1 over the real instances of each bag (0 on padding).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e4  # fits float16 under autocast, still ~0 after softmax


def _batch(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    elif mask.dim() == 1:
        mask = mask.unsqueeze(0)
    return x, mask


def _encoder(in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        mods += [nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout)]
        dim = hidden
    return nn.Sequential(*mods)


class ABMIL(nn.Module):
    """Attention-based deep MIL pooling (Ilse et al. 2018): a = softmax(w^T (tanh(V h) [* sigm(U h)]))."""

    def __init__(self, in_dim: int, n_out: int, hidden_dim: int = 128, attn_dim: int = 128,
                 dropout: float = 0.25, gated: bool = True, encoder_layers: int = 1) -> None:
        super().__init__()
        self.encoder = _encoder(in_dim, hidden_dim, encoder_layers, dropout)
        self.attn_v = nn.Linear(hidden_dim, attn_dim)
        self.attn_u = nn.Linear(hidden_dim, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        x, mask = _batch(x, mask)
        h = self.encoder(x)  # B,N,H
        a = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        scores = self.attn_w(a).squeeze(-1).masked_fill(~mask, NEG)  # B,N
        weights = torch.softmax(scores.float(), dim=1).to(h.dtype) * mask
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)
        logits = self.head(pooled)
        return (logits, weights) if return_attention else logits


class PoolMIL(nn.Module):
    """Mean- or max-pooling baseline; its 'attention' is the share each instance has in the pooled vector."""

    def __init__(self, in_dim: int, n_out: int, hidden_dim: int = 128, dropout: float = 0.25,
                 mode: str = "mean", encoder_layers: int = 1) -> None:
        super().__init__()
        self.mode = mode
        self.encoder = _encoder(in_dim, hidden_dim, encoder_layers, dropout)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        x, mask = _batch(x, mask)
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


class _Block(nn.Module):
    """Pre-norm transformer block; scaled_dot_product_attention keeps memory linear-ish on long bags."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by n_heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, want_cls_attn: bool = False) -> Any:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(b, 1, 1, n, device=x.device, dtype=q.dtype).masked_fill(~mask[:, None, None], NEG)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.drop if self.training else 0.0)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp(self.norm2(x))
        if not want_cls_attn:
            return x
        # class-token row of the attention matrix only (O(N), not O(N^2)), averaged over heads
        logits = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(d // self.heads) + bias[:, :, 0]
        return x, torch.softmax(logits.float(), dim=-1).mean(1)


class PPEG(nn.Module):
    """Pyramid position encoding generator (Shao et al. 2021): depthwise convs over tokens laid on a square."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        side = math.ceil(math.sqrt(n))
        grid = F.pad(tokens, (0, 0, 0, side * side - n)).transpose(1, 2).reshape(b, d, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return grid.reshape(b, d, side * side).transpose(1, 2)[:, :n]


class TransMIL(nn.Module):
    """A small transformer over instances with a class token (after Shao et al. 2021, full attention)."""

    def __init__(self, in_dim: int, n_out: int, hidden_dim: int = 128, n_layers: int = 2, n_heads: int = 4,
                 dropout: float = 0.25, ppeg: bool = False) -> None:
        super().__init__()
        self.encoder = _encoder(in_dim, hidden_dim, 1, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(_Block(hidden_dim, n_heads, dropout) for _ in range(n_layers))
        self.ppeg = PPEG(hidden_dim) if ppeg else None
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        x, mask = _batch(x, mask)
        h = self.encoder(x) * mask.unsqueeze(-1)
        tokens = torch.cat([self.cls.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        attn = None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if last and return_attention:
                tokens, attn = block(tokens, full_mask, want_cls_attn=True)
            else:
                tokens = block(tokens, full_mask)
            if i == 0 and self.ppeg is not None:  # position encoding after the first block, as in TransMIL
                tokens = torch.cat([tokens[:, :1], self.ppeg(tokens[:, 1:]) * mask.unsqueeze(-1)], dim=1)
        logits = self.head(self.norm(tokens[:, 0]))
        if not return_attention:
            return logits
        inst = attn[:, 1:] * mask  # renormalise over instances (the class token attends to itself too)
        return logits, (inst / inst.sum(1, keepdim=True).clamp(min=1e-12)).to(h.dtype)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its JSON spec (what checkpoints store): name, in_dim, n_out and hyper-parameters."""
    name, in_dim, n_out = spec["model"], int(spec["in_dim"]), int(spec["n_out"])
    hidden, dropout = int(spec.get("hidden_dim", 128)), float(spec.get("dropout", 0.25))
    enc_layers = int(spec.get("encoder_layers", 1))
    if name in ("abmil", "abmil-gated"):
        return ABMIL(in_dim, n_out, hidden, int(spec.get("attn_dim", 128)), dropout,
                     gated=name == "abmil-gated", encoder_layers=enc_layers)
    if name in ("mean", "max"):
        return PoolMIL(in_dim, n_out, hidden, dropout, mode=name, encoder_layers=enc_layers)
    if name == "transmil":
        return TransMIL(in_dim, n_out, hidden, int(spec.get("n_layers", 2)), int(spec.get("n_heads", 4)),
                        dropout, bool(spec.get("ppeg", False)))
    raise ValueError(f"unknown MIL model {name!r}; use abmil, abmil-gated, transmil, mean or max")
