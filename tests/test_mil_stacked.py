"""The benchmark's many-models-at-once trainer equals the plain model and torch's AdamW, member by member."""

from __future__ import annotations

import numpy as np
import torch

from wsi_pipeline.mil.models.abmil import ABMIL
from wsi_pipeline.mil.stacked import StackedAdamW, StackedMIL, _concat


def test_stacked_member_equals_abmil():
    torch.manual_seed(0)
    stacked = StackedMIL(3, 10, [16, 16, 8], attn_dim=6, pool="gated", seed=1).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 10)).astype(np.float32) for n in (4, 7, 1)]
    x, seg = _concat(bags, np.arange(3))
    logits, weights = stacked(x, seg, 3, return_attention=True)
    for m, hidden in enumerate([16, 16, 8]):
        ref = ABMIL(10, 1, hidden, 6, dropout=0.0, gated=True).eval()
        with torch.no_grad():  # nn.Linear stores (out, in): transpose the stacked (in, out) weights
            ref.encoder[0].weight.copy_(stacked.w1[m, :, :hidden].T)
            ref.encoder[0].bias.copy_(stacked.b1[m, 0, :hidden])
            ref.attn_v.weight.copy_(stacked.v[m, :hidden].T)
            ref.attn_v.bias.copy_(stacked.bv[m, 0])
            ref.attn_u.weight.copy_(stacked.u[m, :hidden].T)
            ref.attn_u.bias.copy_(stacked.bu[m, 0])
            ref.attn_w.weight.copy_(stacked.w[m].T)
            ref.attn_w.bias.zero_()
            ref.head.weight.copy_(stacked.c[m, :hidden][None])
            ref.head.bias.copy_(stacked.cb[m])
            for b, bag in enumerate(bags):
                out, attn = ref(torch.from_numpy(bag), return_attention=True)
                assert torch.allclose(out[0, 0], logits[m, b], atol=1e-5)
                assert torch.allclose(attn[0], weights[m][seg == b], atol=1e-6)


def test_stacked_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    init = torch.randn(2, 5, 3)
    grads = [torch.randn(2, 5, 3) for _ in range(5)]
    lr, wd = torch.tensor([1e-2, 3e-3]), torch.tensor([1e-1, 1e-2])
    p = torch.nn.Parameter(init.clone())
    opt = StackedAdamW([p], lr, wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    for m in range(2):  # each member follows torch.optim.AdamW with its own lr / weight decay
        q = torch.nn.Parameter(init[m].clone())
        ref = torch.optim.AdamW([q], lr=float(lr[m]), weight_decay=float(wd[m]))
        for g in grads:
            q.grad = g[m].clone()
            ref.step()
        assert torch.allclose(p[m], q, atol=1e-6)


def test_stacked_deeper_encoder_member():
    """With `embed` widths each member's instance encoder is an fc+ReLU stack; eval mode = plain matrix products."""
    stacked = StackedMIL(2, 10, [8, 8], attn_dim=4, pool="gated", seed=3, embed=[12]).eval()
    rng = np.random.default_rng(1)
    bags = [rng.normal(size=(n, 10)).astype(np.float32) for n in (3, 5)]
    x, seg = _concat(bags, np.arange(2))
    logits = stacked(x, seg, 2)
    with torch.no_grad():
        for m in range(2):
            for b, bag in enumerate(bags):
                h = torch.relu(torch.from_numpy(bag) @ stacked.w1[m] + stacked.b1[m])
                h = torch.relu(h @ stacked.deep_w[0][m] + stacked.deep_b[0][m])
                a = torch.tanh(h @ stacked.v[m] + stacked.bv[m]) * torch.sigmoid(h @ stacked.u[m] + stacked.bu[m])
                wgt = torch.softmax((a @ stacked.w[m]).squeeze(-1), 0)
                ref = (wgt[:, None] * h).sum(0) @ stacked.c[m] + stacked.cb[m]
                assert torch.allclose(ref.squeeze(), logits[m, b], atol=1e-5)
