"""Classic-MIL benchmark (Ilse et al. 2018 protocol): 10-fold CV repeated 5 times, bag accuracy, mean +- SE.

Inside each outer training fold only: features are standardised with that fold's statistics and an ensemble is
trained on the training bags: every configuration of a small grid (weight decay, by default) x inner 3-fold
cross-validation splits x `inner_seeds` initialisations, each member on its inner-training part (bagging).
The test bags are scored by the mean probability of all members at the end of their schedule (readout "average":
nothing is chosen, so nothing can be chosen on the test fold). Readout "select" instead keeps the configuration and
epoch with the best out-of-fold `criterion` (and optionally retrains it on the whole fold, `final_seeds`); every
average run also records what selection scores on the same models (both read-outs compared in
benchmarks/RESULTS.md). Models are gated ABMIL (or plain/mean/max pooling) trained many-at-once (`stacked.py`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold

from .. import __version__
from ..errors import TrainingDataError
from ..machine import machine_info
from .bags import load_instance_csv
from .metrics import mean_se
from .stacked import StackedMIL, train_stacked

POOLS = {"abmil-gated": "gated", "abmil": "plain", "mean": "mean", "max": "max"}
# lr 3e-3: chosen by the inner CV in 75 of 100 outer folds of Musk1/Musk2 from the grid lr {1e-3, 3e-3}
DEFAULT_GRID: dict[str, list[float]] = {"lr": [3e-3], "weight_decay": [1e-2, 1e-1], "hidden": [64]}


def _bce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.logaddexp(0, logits) - y * logits  # numerically stable BCE with logits


def outer_fold(
    bags: list[np.ndarray],
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    pool: str,
    grid: list[dict[str, float]],
    inner_folds: int,
    epochs: int,
    batch_size: int,
    max_instances: int | None,
    attn_dim: int,
    dropout: float,
    seed: int,
    criterion: str = "loss",
    final_seeds: int = 0,
    embed: list[int] | None = None,
    inner_seeds: int = 1,
    readout: str = "average",
) -> dict[str, Any]:
    """One outer fold: an ensemble trained on `train` only (inner folds x grid x seeds), predictions for `test`.

    readout "average": the mean probability of every member at its last epoch; "select": the configuration and
    epoch with the best out-of-fold `criterion`, then that configuration's inner-fold models (or `final_seeds`).
    """
    inst = np.concatenate([bags[i] for i in train]).astype(np.float64)
    mean, std = inst.mean(0), inst.std(0)
    std[std < 1e-8] = 1.0
    z = [((b - mean) / std).astype(np.float32) for b in bags]
    inner = list(StratifiedKFold(inner_folds, shuffle=True, random_state=seed).split(train, y[train]))
    members = [(g, k) for g in range(len(grid)) for k in range(inner_folds) for _ in range(inner_seeds)]
    train_mask = np.zeros((len(members), len(bags)), dtype=bool)
    val_mask = np.zeros_like(train_mask)
    for m, (_, k) in enumerate(members):
        train_mask[m, train[inner[k][0]]] = True
        val_mask[m, train[inner[k][1]]] = True
    model = StackedMIL(
        len(members),
        z[0].shape[1],
        [int(grid[g]["hidden"]) for g, _ in members],
        attn_dim,
        pool,
        [float(grid[g].get("dropout", dropout)) for g, _ in members],
        seed,
        embed,
    )
    lr = np.array([grid[g]["lr"] for g, _ in members])
    wd = np.array([grid[g]["weight_decay"] for g, _ in members])
    logits = train_stacked(model, z, y, train_mask, lr, wd, epochs, batch_size, max_instances, seed)  # E,M,B
    # the "select" choice: configuration and epoch with the best out-of-fold score (every training bag is validated
    # once per configuration and seed); computed for either read-out, so one run compares the two on the same models
    val_loss = (_bce(logits, y[None, None]) * val_mask[None]).sum(2)  # E,M
    per_cfg = val_loss.reshape(epochs, len(grid), -1).sum(2) / (len(train) * inner_seeds)  # E,G
    score = per_cfg
    if criterion == "accuracy":  # out-of-fold error, the loss only breaks ties
        wrong = (((logits > 0) != y[None, None]) * val_mask[None]).sum(2)
        score = wrong.reshape(epochs, len(grid), -1).sum(2) / (len(train) * inner_seeds) + 1e-3 * per_cfg
    e_best, g_best = np.unravel_index(np.argmin(score), score.shape)
    rows = [m for m, (g, _) in enumerate(members) if g == g_best]
    selected = expit(logits[e_best][rows][:, test]).mean(0)  # cross-validation bagging of the chosen configuration
    choice = {"config": grid[g_best], "epoch": int(e_best) + 1, "val_loss": float(per_cfg[e_best, g_best])}
    if readout == "average":  # no choice at all: every member at the end of its schedule
        prob = expit(logits[-1][:, test]).mean(0)
        oof = (expit(logits[-1]) * val_mask).sum(0)[train] / val_mask.sum(0)[train]  # each bag's held-out models
        return {
            "accuracy": float(((prob > 0.5) == y[test]).mean()),
            "config": "all",
            "epoch": epochs,
            "oof_accuracy": float(((oof > 0.5) == y[train]).mean()),
            "prob": prob,
            "select_accuracy": float(((selected > 0.5) == y[test]).mean()),
            **{f"select_{k}": v for k, v in choice.items()},
        }
    prob = selected
    if final_seeds:  # retrain the chosen configuration on the whole training fold, several initialisations
        final_mask = np.zeros((final_seeds, len(bags)), dtype=bool)
        final_mask[:, train] = True
        final = StackedMIL(
            final_seeds,
            z[0].shape[1],
            [int(grid[g_best]["hidden"])] * final_seeds,
            attn_dim,
            pool,
            [float(grid[g_best].get("dropout", dropout))] * final_seeds,
            seed + 7,
            embed,
        )
        last = train_stacked(
            final,
            z,
            y,
            final_mask,
            np.full(final_seeds, grid[g_best]["lr"]),
            np.full(final_seeds, grid[g_best]["weight_decay"]),
            int(e_best) + 1,
            batch_size,
            max_instances,
            seed + 7,
        )[-1]
        prob = expit(last[:, test]).mean(0)
    return {"accuracy": float(((prob > 0.5) == y[test]).mean()), **choice, "prob": prob}


def bench_mil(
    csv_path: str | Path,
    folds: int = 10,
    repeats: int = 5,
    model: str = "abmil-gated",
    seed: int = 0,
    grid: dict[str, list[float]] | None = None,
    inner_folds: int = 3,
    epochs: int = 20,
    batch_size: int = 4,
    max_instances: int | None = 128,
    attn_dim: int = 64,
    dropout: float = 0.0,
    readout: str = "average",
    final_seeds: int = 0,
    criterion: str = "accuracy",
    embed: list[int] | None = None,
    inner_seeds: int = 3,
    threads: int | None = 1,
    out_json: str | Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the protocol on a `label,bag_id,features...` CSV; print and return a summary dict.

    The last printed line is one JSON object with at least `accuracy_mean` and `accuracy_se` (SE over the
    folds x repeats fold accuracies; `accuracy_se_repeats` is the SE over the repeat means).
    """
    if model not in POOLS:
        raise TrainingDataError(f"bench_mil supports models {sorted(POOLS)}, not {model!r}")
    if readout not in ("average", "select"):
        raise TrainingDataError(f"bench_mil readout is 'average' or 'select', not {readout!r}")
    recipe = {
        "grid": grid or DEFAULT_GRID,
        "inner_folds": inner_folds,
        "inner_seeds": inner_seeds,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_instances": max_instances,
        "attn_dim": attn_dim,
        "dropout": dropout,
        "embed": embed,
        "readout": readout,
        "criterion": criterion,
        "final_seeds": final_seeds,
    }
    previous = torch.get_num_threads()
    if threads:  # small stacked models: one thread avoids contention on a shared CPU
        torch.set_num_threads(threads)
    try:
        return _bench(csv_path, folds, repeats, model, seed, recipe, out_json, quiet)
    finally:
        torch.set_num_threads(previous)


def _bench(
    csv_path: str | Path,
    folds: int,
    repeats: int,
    model: str,
    seed: int,
    recipe: dict[str, Any],
    out_json: str | Path | None,
    quiet: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    bag_list, store = load_instance_csv(csv_path)
    bags = [store.load(b) for b in bag_list]
    y = np.array([b.label for b in bag_list])
    if set(np.unique(y)) - {0, 1}:
        raise TrainingDataError(f"{csv_path}: bench_mil needs binary bag labels 0/1, got {np.unique(y).tolist()}")
    grid = recipe["grid"]
    configs = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    fold_args = {k: v for k, v in recipe.items() if k != "grid"}
    fold_acc, repeat_acc, per_fold = [], [], []
    oof = np.full((repeats, len(y)), np.nan)  # each bag's test-fold probability, per repeat
    for r in range(repeats):
        outer = StratifiedKFold(folds, shuffle=True, random_state=seed + r)
        correct = 0
        for k, (train, test) in enumerate(outer.split(np.zeros(len(y)), y)):
            res = outer_fold(bags, y, train, test, POOLS[model], configs, seed=seed + 1000 * r + k, **fold_args)
            fold_acc.append(res["accuracy"])
            oof[r, test] = res["prob"]
            correct += res["accuracy"] * len(test)
            per_fold.append({"repeat": r, "fold": k, **{key: v for key, v in res.items() if key != "prob"}})
        repeat_acc.append(correct / len(y))
        if not quiet:
            print(
                f"{Path(csv_path).stem} repeat {r + 1}/{repeats}: accuracy {repeat_acc[-1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    acc_mean, acc_se = mean_se(fold_acc)
    _, rep_se = mean_se(repeat_acc)
    compare = {}
    if recipe["readout"] == "average":  # what inner-CV selection would have scored with the same trained models
        sel_mean, sel_se = mean_se([f["select_accuracy"] for f in per_fold])
        compare = {"select_accuracy_mean": sel_mean, "select_accuracy_se": sel_se}
    summary = {
        "dataset": Path(csv_path).stem,
        "model": model,
        "protocol": f"{folds}-fold CV x {repeats} repeats",
        "bags": len(bags),
        "instances": int(sum(len(b) for b in bags)),
        "features": int(bags[0].shape[1]),
        "accuracy_mean": acc_mean,
        "accuracy_se": acc_se,
        "accuracy_se_repeats": rep_se,
        **compare,
        "repeat_accuracy": repeat_acc,
        "fold_accuracy": fold_acc,
        "bag_ids": [b.bag_id for b in bag_list],
        "bag_labels": y.tolist(),
        "test_probability": oof.round(4).tolist(),
        "recipe": recipe,
        "per_fold": per_fold,
        "package_version": __version__,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine_info("cpu"),
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(summary, indent=1))
    short = {
        k: summary[k]
        for k in ("dataset", "model", "accuracy_mean", "accuracy_se", "accuracy_se_repeats", *compare, "seconds")
    }
    print(json.dumps(short if not math.isnan(acc_mean) else summary))
    return summary
