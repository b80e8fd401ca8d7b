"""Metrics against the libraries: C-index vs scikit-survival, classification metrics vs scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sksurv.column import encode_categorical
from sksurv.datasets import load_gbsg2, load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored

from wsi_pipeline.mil.metrics import bootstrap_ci, c_index, classification_metrics, mean_se, survival_metrics


@pytest.mark.parametrize("loader", [load_whas500, load_gbsg2])
def test_c_index_matches_sksurv_on_real_data(loader):
    x, y = loader()
    x = encode_categorical(x).astype(float)
    risk = CoxPHSurvivalAnalysis(alpha=1e-3).fit(x, y).predict(x)
    event, time = y.dtype.names
    expected = concordance_index_censored(y[event], y[time], risk)[0]
    assert abs(c_index(y[time], y[event], risk) - expected) < 1e-9
    # coarse risks: many ties in risk (count one half) and in time
    coarse = np.round(risk, 1)
    assert abs(c_index(y[time], y[event], coarse) - concordance_index_censored(y[event], y[time], coarse)[0]) < 1e-9
    # a perfectly inverted risk gives 1 - C (no ties)
    assert 0.5 < c_index(y[time], y[event], risk) < 0.9


def test_c_index_small_cases():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 1, 1, 1])
    assert c_index(t, e, [4, 3, 2, 1]) == 1.0
    assert c_index(t, e, [1, 2, 3, 4]) == 0.0
    assert c_index(t, e, [1, 1, 1, 1]) == 0.5
    assert math.isnan(c_index(t, np.zeros(4), [4, 3, 2, 1]))  # no observed event: undefined, not 0.5
    # tied time: event vs censored at the same time is comparable
    assert c_index([2.0, 2.0], [1, 0], [1.0, 0.0]) == 1.0


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(y * 0.3 + rng.random(60) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, 2)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, probs.argmax(1)), abs=1e-12)
    y3 = rng.integers(0, 3, 90)
    p3 = rng.dirichlet(np.ones(3), 90) + np.eye(3)[y3] * 0.3
    p3 /= p3.sum(1, keepdims=True)
    m3 = classification_metrics(y3, p3, 3)
    assert m3["auc"] == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"), abs=1e-12)
    assert m3["f1"] == pytest.approx(f1_score(y3, p3.argmax(1), average="macro"), abs=1e-12)
    one = classification_metrics(np.zeros(5, int), probs[:5], 2)
    assert math.isnan(one["auc"]) and "only class" in one["auc_undefined"]


def test_survival_metrics_undefined_without_events():
    m = survival_metrics([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["c_index"]) and m["c_index_undefined"] == "no observed events in this fold"
    ok = survival_metrics([1.0, 2.0, 3.0, 4.0], [1, 1, 0, 1], [4.0, 3.0, 2.0, 1.0])
    assert ok["c_index"] == 1.0 and 0 <= ok["logrank_p"] <= 1


def test_summary_statistics():
    v = [0.8, 0.9, 0.85, 0.7, None, float("nan")]
    mean, se = mean_se(v)
    finite = [0.8, 0.9, 0.85, 0.7]
    assert mean == pytest.approx(np.mean(finite)) and se == pytest.approx(stats.sem(finite))
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1, 200)
    lo, hi = bootstrap_ci(roc_auc_score, (y, s), n_boot=300)
    assert lo < roc_auc_score(y, s) < hi and hi - lo < 0.2
