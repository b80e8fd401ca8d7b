"""Many small MIL models trained at once, for the classic-MIL benchmark on CPU.

The benchmark trains, per outer fold, a grid of hyper-parameters times inner folds (dozens of models on bags of a
few instances). One model at a time spends its time in per-step overhead, so here M independent models share each
forward pass: weights carry a leading member axis, bags are concatenated instances with a segment index (no
padding), and AdamW runs on the stacked tensors with a learning rate and weight decay per member.
Same architecture as `models.ABMIL` (one fc+ReLU instance encoder, gated or plain attention, linear head); with
`embed` widths the instance encoder is a deeper fc+ReLU(+dropout) stack, as in the MIL-benchmark model of Ilse et al.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class StackedMIL(torch.nn.Module):
    """M binary MIL classifiers: `forward(x, seg, n_bags)` -> logits (M, n_bags)."""

    hmask: torch.Tensor  # buffers (register_buffer)
    drop: torch.Tensor

    def __init__(
        self,
        members: int,
        in_dim: int,
        hidden: list[int],
        attn_dim: int = 64,
        pool: str = "gated",
        dropout: list[float] | None = None,
        seed: int = 0,
        embed: list[int] | None = None,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h, m = max(hidden), members
        self.pool = pool

        def uniform(*shape: int, fan_in: int) -> torch.nn.Parameter:  # torch.nn.Linear's default init
            bound = 1 / math.sqrt(fan_in)
            return torch.nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        widths = [in_dim, *(embed or []), h]  # fc widths of the instance encoder; the last one is `hidden`
        self.w1, self.b1 = uniform(m, in_dim, widths[1], fan_in=in_dim), uniform(m, 1, widths[1], fan_in=in_dim)
        pairs = list(zip(widths[1:-1], widths[2:], strict=True))
        self.deep_w = torch.nn.ParameterList([uniform(m, a, b, fan_in=a) for a, b in pairs])
        self.deep_b = torch.nn.ParameterList([uniform(m, 1, b, fan_in=a) for a, b in pairs])
        self.v, self.bv = uniform(m, h, attn_dim, fan_in=h), uniform(m, 1, attn_dim, fan_in=h)
        self.u, self.bu = uniform(m, h, attn_dim, fan_in=h), uniform(m, 1, attn_dim, fan_in=h)
        self.w = uniform(m, attn_dim, 1, fan_in=attn_dim)
        self.c, self.cb = uniform(m, h, fan_in=h), uniform(m, 1, fan_in=h)
        # members with a smaller hidden size use the first units only
        self.register_buffer("hmask", (torch.arange(h)[None] < torch.tensor(hidden)[:, None]).float()[:, None])
        self.register_buffer("drop", torch.tensor(dropout or [0.0] * m, dtype=torch.float32).view(m, 1, 1))

    def forward(self, x: torch.Tensor, seg: torch.Tensor, n_bags: int, return_attention: bool = False):
        m = self.w1.shape[0]
        h = torch.relu(torch.einsum("nd,mdh->mnh", x, self.w1) + self.b1)  # M,N,H
        for w, b in zip(self.deep_w, self.deep_b, strict=True):
            h = torch.relu(torch.baddbmm(b, self._dropout(h), w))
        h = self._dropout(h * self.hmask)
        idx = seg.expand(m, -1)
        if self.pool in ("gated", "plain"):
            a = torch.tanh(torch.baddbmm(self.bv, h, self.v))
            if self.pool == "gated":
                a = a * torch.sigmoid(torch.baddbmm(self.bu, h, self.u))
            s = torch.bmm(a, self.w).squeeze(-1)  # M,N
            smax = torch.full((m, n_bags), -torch.inf, dtype=s.dtype).scatter_reduce(1, idx, s, "amax")
            e = torch.exp(s - smax.gather(1, idx))
            den = torch.zeros(m, n_bags, dtype=s.dtype).index_add(1, seg, e)
            wgt = e / den.gather(1, idx)  # softmax within each bag
        elif self.pool == "mean":
            count = torch.zeros(n_bags).index_add(0, seg, torch.ones_like(seg, dtype=torch.float32))
            wgt = (1 / count[seg]).expand(m, -1)
        else:  # max
            pooled = torch.full((m, n_bags, h.shape[2]), -torch.inf).scatter_reduce(
                1, idx[..., None].expand_as(h), h, "amax"
            )
            return (pooled * self.c[:, None]).sum(-1) + self.cb
        pooled = torch.zeros(m, n_bags, h.shape[2], dtype=h.dtype).index_add(1, seg, wgt[..., None] * h)
        logits = (pooled * self.c[:, None]).sum(-1) + self.cb
        return (logits, wgt) if return_attention else logits

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:  # inverted dropout with a rate per member
        if self.training and float(self.drop.max()) > 0:
            keep = (torch.rand_like(h) >= self.drop).float()
            h = h * keep / (1 - self.drop)
        return h


class StackedAdamW:
    """AdamW (decoupled weight decay) over stacked parameters with a learning rate and decay per member."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: torch.Tensor,
        wd: torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, wd, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr = (self.lr * scale).view(shape)
            p.mul_(1 - lr * self.wd.view(shape))
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = v.sqrt().div_(math.sqrt(c2)).add_(self.eps)
            p.addcdiv_(m * (lr / c1), denom, value=-1.0)  # in place, few temporaries: this runs per step
            p.grad = None


def train_stacked(
    model: StackedMIL,
    bags: list[np.ndarray],
    labels: np.ndarray,
    train_mask: np.ndarray,
    lr: np.ndarray,
    wd: np.ndarray,
    epochs: int,
    batch_size: int,
    max_instances: int | None,
    seed: int,
) -> np.ndarray:
    """Train every member on its own bags (`train_mask` (M, B)); return eval-mode logits per epoch (E, M, B).

    Each step draws a mini-batch of bags from the union of training bags; a member's loss counts only the bags
    in its mask. After every epoch all bags are scored in eval mode, so the caller can pick the epoch by
    validation loss and read the test predictions of that epoch (same as stopping there; the cosine schedule
    is over `epochs`).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = StackedAdamW(
        list(model.parameters()), torch.tensor(lr, dtype=torch.float32), torch.tensor(wd, dtype=torch.float32)
    )
    y = torch.tensor(labels, dtype=torch.float32)
    tmask = torch.tensor(train_mask, dtype=torch.float32)
    pool = np.flatnonzero(train_mask.any(0))
    steps = math.ceil(len(pool) / batch_size)
    all_x, all_seg = _concat(bags, np.arange(len(bags)))
    out = np.zeros((epochs, train_mask.shape[0], len(bags)), dtype=np.float32)
    total = epochs * steps
    for ep in range(epochs):
        model.train()
        order = rng.permutation(pool)
        for s in range(steps):
            chosen = order[s * batch_size : (s + 1) * batch_size]
            sub = [_cap(bags[i], max_instances, rng) for i in chosen]
            x, seg = _concat(sub, np.arange(len(sub)))
            logits = model(x, seg, len(sub))
            w = tmask[:, chosen]
            bce = F.binary_cross_entropy_with_logits(logits, y[chosen].expand_as(logits), reduction="none")
            loss = ((bce * w).sum(1) / w.sum(1).clamp(min=1)).sum()  # members are independent: sum
            loss.backward()
            opt.step(0.5 * (1 + math.cos(math.pi * (ep * steps + s) / total)))
        model.eval()
        with torch.no_grad():
            out[ep] = model(all_x, all_seg, len(bags)).numpy()
    return out


def _cap(x: np.ndarray, max_instances: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_instances is None or len(x) <= max_instances:
        return x
    return x[rng.choice(len(x), max_instances, replace=False)]


def _concat(bags: list[np.ndarray], ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.concatenate(bags).astype(np.float32))
    seg = torch.from_numpy(np.repeat(ids, [len(b) for b in bags]))
    return x, seg
