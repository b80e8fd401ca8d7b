"""A small TransMIL (Shao et al. 2021): transformer blocks over the bag with a class token, optional PPEG."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model
from .layers import NEG, as_batch, instance_encoder


class TransformerBlock(nn.Module):
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

    def __init__(
        self,
        in_dim: int,
        n_out: int,
        hidden_dim: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.25,
        ppeg: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = instance_encoder(in_dim, hidden_dim, 1, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        nn.init.normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(hidden_dim, n_heads, dropout) for _ in range(n_layers))
        self.ppeg = PPEG(hidden_dim) if ppeg else None
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        x, mask = as_batch(x, mask)
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
        assert attn is not None  # the last block returned the class token's attention
        inst = attn[:, 1:] * mask  # renormalise over instances (the class token attends to itself too)
        return logits, (inst / inst.sum(1, keepdim=True).clamp(min=1e-12)).to(h.dtype)


@register_model("transmil")
def build_transmil(spec: dict[str, Any]) -> nn.Module:
    return TransMIL(
        int(spec["in_dim"]),
        int(spec["n_out"]),
        int(spec.get("hidden_dim", 128)),
        int(spec.get("n_layers", 2)),
        int(spec.get("n_heads", 4)),
        float(spec.get("dropout", 0.25)),
        bool(spec.get("ppeg", False)),
    )
