"""Survival losses: Cox (Breslow) against a direct computation and scikit-survival's fit; discrete-time NLL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sksurv.column import encode_categorical
from sksurv.datasets import load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis

from wsi_pipeline.mil.losses import cox_loss, discrete_nll, hazard_risk, time_bins, to_bin


def direct_breslow(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    total = 0.0
    for i in np.flatnonzero(event):
        at_risk = time >= time[i]
        total += risk[i] - np.log(np.exp(risk[at_risk]).sum())
    return -total / event.sum()


def test_cox_loss_equals_direct_partial_likelihood_with_ties():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 8, 40).astype(float)  # many tied times
    event = rng.integers(0, 2, 40)
    risk = rng.normal(size=40)
    got = cox_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event)).item()
    assert got == pytest.approx(direct_breslow(risk, time, event), rel=1e-6)
    zero = cox_loss(torch.tensor(risk, requires_grad=True), torch.tensor(time), torch.zeros(40))
    assert zero.item() == 0.0 and zero.requires_grad


def test_cox_loss_is_minimised_at_sksurv_breslow_fit():
    x, y = load_whas500()
    x = encode_categorical(x)[["age", "bmi", "hr", "sysbp"]].astype(float).to_numpy()
    x = (x - x.mean(0)) / x.std(0)
    event, time = y.dtype.names
    beta = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x, y).coef_
    b = torch.tensor(beta, requires_grad=True)
    loss = cox_loss(torch.tensor(x) @ b, torch.tensor(y[time].copy()), torch.tensor(y[event].astype(float)))
    loss.backward()
    assert b.grad.abs().max().item() < 1e-5  # the library's optimum is a stationary point of our loss
    moved = cox_loss(
        torch.tensor(x) @ (b.detach() + 0.1), torch.tensor(y[time].copy()), torch.tensor(y[event].astype(float))
    )
    assert moved.item() > loss.item()


def test_discrete_nll_matches_direct_likelihood():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(12, 4))
    bins = rng.integers(0, 4, 12)
    events = rng.integers(0, 2, 12)
    h = 1 / (1 + np.exp(-logits))
    expected = []
    for i in range(12):
        j = bins[i]
        surv_before = np.prod(1 - h[i, :j])
        lik = surv_before * h[i, j] if events[i] else surv_before * (1 - h[i, j])
        expected.append(-np.log(lik))
    got = discrete_nll(torch.tensor(logits), torch.tensor(bins), torch.tensor(events)).item()
    assert got == pytest.approx(np.mean(expected), rel=1e-6)


def test_time_bins_from_observed_event_quantiles():
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100, 200.0])
    events = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    edges = time_bins(times, events, 4)
    assert np.allclose(edges, np.quantile(times[:8], [0.25, 0.5, 0.75]))  # censored times ignored
    assert to_bin(np.array([0.5, 1000.0]), edges).tolist() == [0, 3]  # open-ended first and last bins


def test_hazard_risk_orders_by_hazard():
    low, high = torch.full((1, 4), -2.0), torch.full((1, 4), 2.0)
    assert hazard_risk(high).item() > hazard_risk(low).item()
