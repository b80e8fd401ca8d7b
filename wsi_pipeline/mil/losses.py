"""Training losses: cross-entropy, discrete-time survival NLL (Zadeh & Schmid 2021) and Cox partial likelihood."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels.long(), weight=weight)


def time_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges (n_bins - 1 of them) at quantiles of the *observed* event times.

    A time t falls in bin `np.searchsorted(edges, t, side="right")`; the first and last bins are open-ended, so
    test patients outside the training range still get a bin.
    """
    observed = np.asarray(times, dtype=float)[np.asarray(events).astype(bool)]
    if observed.size == 0:
        observed = np.asarray(times, dtype=float)  # no events: fall back to all times, loss still defined
    edges = np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.unique(edges)


def to_bin(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, np.asarray(times, dtype=float), side="right").astype(np.int64)


def discrete_nll(
    logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Negative log-likelihood of a discrete-time hazard model; logits (B, K) give hazards h_k = sigmoid.

    Observed event in bin j: -log h_j - sum_{k<j} log(1 - h_k). Censored in bin j (survived at least through
    it, the convention of pycox's logistic-hazard loss): -sum_{k<=j} log(1 - h_k). `alpha` adds weight to the
    uncensored part as in Chen et al.'s PORPOISE: (1 - alpha) * nll + alpha * uncensored_nll.
    """
    logits = logits.float()
    bins = bins.long().view(-1, 1)
    events = events.float().view(-1, 1)
    log_h = F.logsigmoid(logits)  # log h_k
    log_1mh = F.logsigmoid(-logits)  # log(1 - h_k)
    k = torch.arange(logits.shape[1], device=logits.device).view(1, -1)
    before = (k < bins).float()
    at = (k == bins).float()
    surv_before = (log_1mh * before).sum(1, keepdim=True)
    uncensored = -(surv_before + (log_h * at).sum(1, keepdim=True)) * events
    censored = -(surv_before + (log_1mh * at).sum(1, keepdim=True)) * (1 - events)
    loss = uncensored + censored
    if alpha > 0:
        loss = (1 - alpha) * loss + alpha * uncensored
    return loss.mean()


def hazard_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk from discrete hazards: minus the sum of the survival curve (a higher value = an earlier event)."""
    surv = torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1)
    return -surv.sum(1)


def cox_loss(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of ties, averaged over observed events.

    -1/d * sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]. Returns 0 (with a gradient path) when the
    batch has no event, so a batch of censored patients does not break training.
    """
    risk = risk.float().view(-1)
    times = times.float().view(-1)
    events = events.float().view(-1)
    order = torch.argsort(times, descending=True)
    r, t, e = risk[order], times[order], events[order]
    log_cum = torch.logcumsumexp(r, dim=0)  # log-sum over everyone with time >= t (so far in descending order)
    # Breslow: the risk set of a tied time includes all tied subjects -> take the last index of each tie group
    asc = torch.flip(t, [0])
    last = len(t) - 1 - (torch.searchsorted(asc.contiguous(), t.contiguous(), right=False))
    log_risk_set = log_cum[last]
    n_events = e.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((r - log_risk_set) * e).sum() / n_events
