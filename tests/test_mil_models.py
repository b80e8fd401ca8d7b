"""MIL models: output shapes, attention per instance, padding and permutation invariance, bag sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.mil.engine import collate, sample_instances
from wsi_pipeline.mil.models import build_model

SPECS = [
    {"model": "abmil-gated"},
    {"model": "abmil"},
    {"model": "mean"},
    {"model": "max"},
    {"model": "transmil", "n_layers": 2, "n_heads": 2},
    {"model": "transmil", "n_layers": 1, "n_heads": 2, "ppeg": True},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["model"] + ("+ppeg" if s.get("ppeg") else ""))
def test_model_attention_and_padding(spec):
    torch.manual_seed(0)
    model = build_model(spec | {"in_dim": 12, "n_out": 3, "hidden_dim": 16, "attn_dim": 8}).eval()
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 12)).astype(np.float32) for n in (5, 9, 2)]
    x, mask = collate(bags)
    with torch.no_grad():
        logits, attn = model(x, mask, return_attention=True)
        assert logits.shape == (3, 3) and attn.shape == (3, 9)
        assert torch.allclose(attn.sum(1), torch.ones(3), atol=1e-5)
        assert (attn[~mask] == 0).all() and (attn >= 0).all()
        for i, bag in enumerate(bags):
            if spec.get("ppeg"):
                continue  # the position encoding sees the padded grid: only the unpadded bag is checked
            alone = model(torch.from_numpy(bag))  # (N, D) input, no mask
            assert torch.allclose(alone[0], logits[i], atol=1e-5), "padding must not change a bag's output"
        if spec["model"] != "transmil":  # set functions: instance order does not matter
            perm = torch.randperm(9)
            single = torch.from_numpy(bags[1])
            assert torch.allclose(model(single), model(single[perm]), atol=1e-5)


def test_model_learns_planted_signal():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bags, labels = [], []
    for i in range(40):
        x = rng.normal(size=(20, 8)).astype(np.float32)
        if i % 2:
            x[rng.integers(0, 20), 0] += 4.0  # one key instance
        bags.append(x)
        labels.append(i % 2)
    model = build_model(
        {"model": "abmil-gated", "in_dim": 8, "n_out": 2, "hidden_dim": 16, "attn_dim": 8, "dropout": 0.0}
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, mask = collate(bags)
    y = torch.tensor(labels)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    logits, attn = model(x, mask, return_attention=True)
    assert (logits.argmax(1) == y).float().mean() > 0.9
    key = torch.from_numpy(np.stack([b[:, 0].argmax() for b in bags]))
    hit = (attn.argmax(1) == key)[y == 1].float().mean()
    assert hit > 0.8  # attention finds the key instance in positive bags


def test_bag_sampling():
    rng = np.random.default_rng(0)
    x = np.arange(100, dtype=np.float32).reshape(50, 2)
    assert sample_instances(x, rng, None, 0.0) is x
    capped = sample_instances(x, rng, 10, 0.0)
    assert capped.shape == (10, 2) and np.all(np.diff(capped[:, 0]) > 0)  # a subset, in order
    dropped = sample_instances(x, rng, None, 0.5)
    assert dropped.shape == (25, 2) and len(np.unique(dropped[:, 0])) == 25
