"""Evaluation metrics: classification (AUC, balanced accuracy, F1), Harrell's C-index, log-rank, summaries.

Every metric that can be undefined on a fold (one class only, no observed event) returns NaN plus a reason
rather than a misleading default such as 0.5.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score


def c_index(times: Any, events: Any, risks: Any, tied_tol: float = 1e-8) -> float:
    """Harrell's concordance index; higher risk should mean an earlier event.

    A pair (i, j) is comparable when i has an observed event and t_i < t_j, or t_i == t_j with j censored (the
    definition of scikit-survival's `concordance_index_censored`). It is concordant when r_i > r_j; risks within
    `tied_tol` count one half. NaN when no pair is comparable (e.g. no observed event).
    O(n^2) in row blocks of bounded memory.
    """
    t = np.asarray(times, dtype=float).ravel()
    e = np.asarray(events).astype(bool).ravel()
    r = np.asarray(risks, dtype=float).ravel()
    if not (len(t) == len(e) == len(r)):
        raise ValueError(f"c_index: times, events, risks differ in length ({len(t)}, {len(e)}, {len(r)})")
    if not np.all(np.isfinite(r)):
        raise ValueError("c_index: risks contain NaN or infinity")
    idx = np.flatnonzero(e)
    concordant = tied = comparable = 0.0
    block = max(1, 4_000_000 // max(len(t), 1))
    for s in range(0, len(idx), block):
        i = idx[s : s + block]
        ti, ri = t[i, None], r[i, None]
        comp = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        diff = ri - r[None, :]
        is_tie = np.abs(diff) <= tied_tol
        comparable += comp.sum()
        tied += (comp & is_tie).sum()
        concordant += (comp & ~is_tie & (diff > 0)).sum()
    if comparable == 0:
        return float("nan")
    return float((concordant + 0.5 * tied) / comparable)


def classification_metrics(y_true: Any, prob: Any, n_classes: int) -> dict[str, Any]:
    """AUC (binary, or macro one-vs-rest), balanced accuracy, (macro) F1 and accuracy from class probabilities."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float).reshape(len(y), n_classes)
    pred = p.argmax(1)
    with warnings.catch_warnings():  # a fold may lack a class; sklearn warns, the value is still defined
        warnings.simplefilter("ignore", UserWarning)
        out: dict[str, Any] = {
            "n": len(y),
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
            "f1": float(f1_score(y, pred, average="binary" if n_classes == 2 else "macro", zero_division=0)),
        }
    present = np.unique(y)
    if len(present) < 2:
        out["auc"], out["auc_undefined"] = float("nan"), f"only class {present.tolist()} present in this fold"
    elif n_classes == 2:
        out["auc"] = float(roc_auc_score(y, p[:, 1]))
    elif len(present) < n_classes:
        out["auc"], out["auc_undefined"] = float("nan"), "some classes absent from this fold (macro OvR AUC)"
    else:
        out["auc"] = float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    return out


def survival_metrics(times: Any, events: Any, risks: Any) -> dict[str, Any]:
    """C-index and the log-rank p-value of a median split of predicted risk (NaN + reason when undefined)."""
    t, e, r = np.asarray(times, float), np.asarray(events, int), np.asarray(risks, float)
    out: dict[str, Any] = {"n": len(t), "n_events": int(e.sum())}
    if e.sum() == 0:
        reason = "no observed events in this fold"
        return out | {"c_index": float("nan"), "c_index_undefined": reason, "logrank_p": float("nan")}
    out["c_index"] = c_index(t, e, r)
    if math.isnan(out["c_index"]):
        out["c_index_undefined"] = "no comparable pairs in this fold"
    out["logrank_p"] = logrank_median_split(t, e, r)
    return out


def risk_groups(risks: Any) -> np.ndarray:
    """High (True) / low risk by the median of predicted risk."""
    r = np.asarray(risks, float)
    return r > np.median(r)


def logrank_median_split(times: Any, events: Any, risks: Any) -> float:
    """Log-rank p-value (lifelines) between predicted high- and low-risk halves (median split)."""
    return logrank_groups(times, events, risk_groups(risks))


def logrank_groups(times: Any, events: Any, high: Any) -> float:
    from lifelines.statistics import logrank_test

    high = np.asarray(high, bool)
    t, e = np.asarray(times, float), np.asarray(events, int)
    if high.all() or not high.any():
        return float("nan")
    res = logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high])
    return float(res.p_value)


def mean_se(values: Any) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) over the finite values; NaN when none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def bootstrap_ci(
    metric: Any, arrays: tuple[np.ndarray, ...], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(*arrays)` resampling rows; undefined resamples are skipped."""
    n = len(arrays[0])
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        take = rng.integers(0, n, n)
        try:
            value = metric(*(a[take] for a in arrays))
        except ValueError:
            continue
        if value is not None and np.isfinite(value):
            stats.append(value)
    if len(stats) < max(10, n_boot // 10):
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
