"""Generic CSV bags and the classic-MIL benchmark on the real Musk1 data (a quick 2-fold smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import TrainingDataError
from wsi_pipeline.mil.bags import load_instance_csv
from wsi_pipeline.mil.bench import bench_mil
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.engine import Problem, fit, model_spec, predict_bags

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MUSK1 = SHARED / "mil" / "musk1.csv"
needs_musk = pytest.mark.skipif(not MUSK1.exists(), reason="shared MIL data not present")


@needs_musk
def test_load_instance_csv_musk1():
    bags, store = load_instance_csv(MUSK1)
    assert len(bags) == 92 and sum(b.label for b in bags) == 47  # the README's table
    assert sum(len(store.load(b)) for b in bags) == 476 and store.dim == 166


@needs_musk
def test_same_training_code_on_csv_bags():
    """engine.fit (the cohort trainer) on Musk1 bags: 2 folds, well above chance."""
    bags, store = load_instance_csv(MUSK1)
    y = np.array([b.label for b in bags])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(bags))
    problem = Problem("classification", "ce", 2, ["0", "1"])
    cfg = TrainConfig(
        hidden_dim=64,
        attn_dim=32,
        lr=2e-3,
        weight_decay=1e-2,
        epochs=15,
        batch_size=4,
        standardize=True,
        quiet=True,
        device="cpu",
        num_threads=1,
        class_weights=False,
    )
    correct = 0
    for half in (order[:46], order[46:]):
        train = [bags[i] for i in order if i not in set(half)]
        model, _ = fit(model_spec(cfg, store.dim, problem), store, train, [], problem, cfg)
        scores = predict_bags(model, store, [bags[i] for i in half], problem, torch.device("cpu"))["scores"]
        correct += int((scores.argmax(1) == y[half]).sum())
    assert correct / len(bags) > 0.75


@needs_musk
def test_bench_mil_musk1_smoke(capsys, tmp_path):
    grid = {"lr": [2e-3], "weight_decay": [1e-2], "hidden": [64]}
    res = bench_mil(
        MUSK1,
        folds=2,
        repeats=1,
        seed=0,
        grid=grid,
        inner_folds=2,
        epochs=20,
        batch_size=4,
        inner_seeds=2,
        out_json=tmp_path / "musk1.json",
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["accuracy_mean"] == pytest.approx(res["accuracy_mean"]) and "accuracy_se" in summary
    assert res["accuracy_mean"] > 0.7  # chance is ~0.51
    saved = json.loads((tmp_path / "musk1.json").read_text())
    assert saved["machine"]["cpu_count"] >= 1 and len(saved["fold_accuracy"]) == 2
    assert saved["recipe"]["inner_seeds"] == 2 and saved["recipe"]["readout"] == "average"
    assert all(0.5 < f["oof_accuracy"] <= 1 for f in saved["per_fold"])  # held-out score inside the training fold
    # the same run scores the inner-CV selection on the same trained models, for comparison
    assert summary["select_accuracy_mean"] == pytest.approx(np.mean([f["select_accuracy"] for f in saved["per_fold"]]))
    assert all(1 <= f["select_epoch"] <= 20 for f in saved["per_fold"])
    assert saved["machine"]["device"] == "cpu" and saved["machine"]["torch"] == torch.__version__
    # every bag is tested exactly once per repeat, and the fold accuracies follow from those probabilities
    prob = np.array(saved["test_probability"])
    labels = np.array(saved["bag_labels"])
    assert prob.shape == (1, 92) and np.isfinite(prob).all() and len(saved["bag_ids"]) == 92
    assert ((prob[0] > 0.5) == labels).mean() == pytest.approx(res["accuracy_mean"], abs=0.02)


@needs_musk
def test_bench_mil_select_readout_reports_its_choices(capsys):
    """The 'select' read-out picks a configuration and epoch per outer fold from inner-CV scores only."""
    grid = {"lr": [2e-3], "weight_decay": [1e-2, 1e-1], "hidden": [32]}
    res = bench_mil(
        MUSK1,
        folds=2,
        repeats=1,
        seed=1,
        grid=grid,
        inner_folds=2,
        epochs=8,
        readout="select",
        final_seeds=2,
        inner_seeds=1,
        quiet=True,
    )
    assert res["accuracy_mean"] > 0.6
    for fold in res["per_fold"]:
        assert fold["config"]["weight_decay"] in (1e-2, 1e-1) and 1 <= fold["epoch"] <= 8
    with pytest.raises(TrainingDataError, match="readout"):
        bench_mil(MUSK1, readout="best")


def test_bad_instance_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,1,0.5,nan\n0,2,0.1,0.2\n")
    with pytest.raises(TrainingDataError, match="NaN or infinity"):
        load_instance_csv(bad)
    three = tmp_path / "three.csv"
    three.write_text("".join(f"{i % 3},{i},0.{i},1.0\n" for i in range(12)))
    with pytest.raises(TrainingDataError, match="binary bag labels"):
        bench_mil(three, folds=2, repeats=1)
