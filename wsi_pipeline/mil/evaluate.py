"""Summary of a trained task over its folds: mean +- SE, bootstrap CIs, ROC / Kaplan-Meier figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from ..errors import ConfigError
from ..io.jsonio import write_json_atomic
from .metrics import bootstrap_ci, c_index, logrank_groups, mean_se
from .plots import plot_km, plot_roc

CLASS_METRICS = ("auc", "balanced_accuracy", "f1", "accuracy")
SURV_METRICS = ("c_index", "logrank_p")


def _rank_within_fold(df: pd.DataFrame) -> np.ndarray:
    """Risk as a percentile within its fold: risks of different fold models are on different scales."""
    return df.groupby("index")["risk"].rank(pct=True).to_numpy()


def evaluate_task(out_dir: str | Path) -> dict[str, Any]:
    """Read every finished fold of `out_dir`; write summary.json, summary.csv, folds.csv and a figure."""
    out = Path(out_dir)
    try:
        config = json.loads((out / "config.json").read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{out}: no config.json; run training for this task first") from exc
    task, train = config["task"], config["train"]
    fold_dirs = sorted(p.parent for p in out.glob("fold*/metrics.json"))
    if not fold_dirs:
        raise ConfigError(f"{out}: no finished fold (fold*/metrics.json); run training first")
    metrics = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    preds = pd.concat([pd.read_csv(d / "predictions.csv", dtype={"bag_id": str}) for d in fold_dirs])
    survival = task["type"] == "survival"
    names = SURV_METRICS if survival else CLASS_METRICS
    n_total = len(train["seeds"]) * train["folds"]
    summary: dict[str, Any] = {
        "task": task["name"],
        "type": task["type"],
        "model": train["model"],
        "folds_done": len(metrics),
        "folds_total": n_total,
        "metrics": {},
    }
    # pooled out-of-fold predictions of the first seed: every patient exactly once
    first = preds[preds["seed"] == preds["seed"].min()]
    n_boot, rng_seed = int(train.get("bootstrap", 1000)), int(train.get("seed", 0))
    for name in names:
        values = [m.get(name) for m in metrics]
        mean, se = mean_se([np.nan if v is None else v for v in values])
        undefined = [m["index"] for m in metrics if m.get(name) is None]
        summary["metrics"][name] = {"mean": mean, "se": se, "n_folds": len(values) - len(undefined)}
        if undefined:
            summary["metrics"][name]["undefined_folds"] = undefined
    if survival:
        t, e = first["time"].to_numpy(float), first["event"].to_numpy(int)
        r = _rank_within_fold(first)
        pooled = c_index(t, e, r) if e.sum() else float("nan")
        lo, hi = bootstrap_ci(c_index, (t, e, r), n_boot, seed=rng_seed)
        summary["metrics"]["c_index"] |= {"pooled": pooled, "ci_low": lo, "ci_high": hi}
        high = first.groupby("index")["risk"].transform(lambda s: s > s.median()).to_numpy(bool)
        p = logrank_groups(t, e, high) if e.sum() else float("nan")
        summary["metrics"]["logrank_p"]["pooled"] = p
        plot_km(t, e, high, out / "km.png", p, title=task["name"])
    else:
        classes = config["classes"]
        y = first["y_true"].to_numpy(int)
        probs = first[[f"prob_{c}" for c in classes]].to_numpy(float)

        def auc(yy: np.ndarray, pp: np.ndarray) -> float:
            if len(np.unique(yy)) < len(classes):
                return float("nan")
            return roc_auc_score(yy, pp[:, 1]) if len(classes) == 2 else roc_auc_score(yy, pp, multi_class="ovr")

        def bacc(yy: np.ndarray, pp: np.ndarray) -> float:
            return balanced_accuracy_score(yy, pp.argmax(1))

        for name, fn in (("auc", auc), ("balanced_accuracy", bacc)):
            lo, hi = bootstrap_ci(fn, (y, probs), n_boot, seed=rng_seed)
            summary["metrics"][name] |= {"pooled": float(fn(y, probs)), "ci_low": lo, "ci_high": hi}
        plot_roc(y, probs, classes, out / "roc.png", title=task["name"])
    summary["figure"] = str(out / ("km.png" if survival else "roc.png"))
    fold_table = pd.DataFrame(
        [{k: m.get(k) for k in ("index", "seed", "fold", "n_test", "best_epoch", *names)} for m in metrics]
    )
    fold_table.to_csv(out / "folds.csv", index=False)
    rows = [
        {"metric": k, **{c: v.get(c) for c in ("mean", "se", "ci_low", "ci_high", "pooled", "n_folds")}}
        for k, v in summary["metrics"].items()
    ]
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    write_json_atomic(out / "summary.json", summary)
    return json.loads((out / "summary.json").read_text())
