"""The zero-shot task folder (explain/zero_shot.py), laid out as a trained task's (mil/train.py) so one reader
tabulates both:

  config.json                 task, train (model "mi-zero"), classes, sheet, features_dir, and `zero_shot`:
                              pooling_order, pooling_k, primary_k, prompts, templates, prompt hash, text provenance
  splits.json                 the trained tasks' patient-level splits (mil.splits.task_splits)
  fold{NN}/predictions.csv    the fold's test bags at the primary pooling, a trained fold's columns + `pooling`
  fold{NN}/metrics.json       a trained fold's keys (n_train 0, no epochs) + `poolings`: the metrics of each pooling
  summary.json|csv, folds.csv, roc.png   mil.evaluate.evaluate_task at the primary pooling; summary.json adds
                              `zero_shot`: the config's section + `poolings`: name -> AUC / accuracy / balanced
                              accuracy (fold mean, SE, pooled over all bags)
  zero_shot/poolings.csv      every bag x pooling: class probabilities and the prediction
  zero_shot/tiles.json        per bag, the primary K tiles of its predicted class (slide, row, level-0 x/y, logit)
  zero_shot/summary.csv       per pooling and metric: fold mean, SE, pooled over all bags
and ATTENTION/{slide}.zarr (as trained tasks write): per tile the logit of its bag's predicted class, which the
heatmaps and the explain page read like attention.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..io.jsonio import read_json, write_json_atomic
from ..mil.bags import Bag, ZarrStore
from ..mil.config import TaskConfig, TrainConfig
from ..mil.evaluate import evaluate_task
from ..mil.metrics import classification_metrics, mean_se
from .text_cache import ConceptEmbeddings

MODEL_NAME = "mi-zero"  # summary.json's `model`, beside the trained tasks' MIL model names
ZERO_SHOT_DIR = "zero_shot"
POOLING_METRICS = ("auc", "accuracy", "balanced_accuracy")
TILE_SCORE = "logit_scale * cosine of the tile feature with the predicted class's prompt-ensemble text embedding"
METHOD = "MI-Zero (Lu et al., CVPR 2023): softmax over classes of each class's mean top-K tile logit"


@dataclass
class BagScores:
    """One bag's zero-shot result: class probabilities per pooling, and the tiles behind its prediction."""

    bag: Bag
    probs: dict[str, np.ndarray]  # pooling -> (classes,)
    predicted: int  # class index at the primary pooling
    top_tiles: list[dict[str, Any]]  # the primary K tiles of the predicted class, best first


@dataclass
class ZeroShotRun:
    """What one zero-shot task was scored with: written to config.json, read back by `summarize_zero_shot`."""

    out: Path
    task: TaskConfig
    train: TrainConfig
    classes: list[str]
    poolings: dict[str, int | None]  # name -> K (None: mean over all tiles), in output order
    sheet: Path
    features_dir: Path
    encoder: str
    embeddings: ConceptEmbeddings

    @property
    def primary(self) -> str:
        return f"top{self.task.primary_k}"

    def config(self) -> dict[str, Any]:
        emb = self.embeddings
        return {
            "task": self.task.model_dump(),
            "train": self.train.model_dump() | {"model": MODEL_NAME},  # no MIL model was trained
            "classes": self.classes,
            "sheet": str(self.sheet),
            "features_dir": str(self.features_dir),
            "zero_shot": {
                "method": METHOD,
                "encoder": self.encoder,
                "pooling_order": list(self.poolings),  # JSON objects here are written with sorted keys
                "pooling_k": self.poolings,
                "primary_k": self.task.primary_k,
                "primary_pooling": self.primary,
                "class_prompts": self.task.class_prompts,
                "templates": self.task.templates,
                "concept_set": emb.concept_set,
                "prompt_hash": emb.prompt_hash,
                "logit_scale": emb.logit_scale,
                "logit_bias": emb.logit_bias,
                "text_encoder": emb.text_provenance,
            },
        }


def prob_columns(classes: list[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def pooling_table(run: ZeroShotRun, scored: list[BagScores]) -> pd.DataFrame:
    """Every bag x pooling: the bag, its label, the class probabilities and the predicted class."""
    rows = []
    for s in scored:
        assert s.bag.label is not None  # load_sheet keeps labelled rows only
        base = {
            "bag_id": s.bag.bag_id,
            "patient_id": s.bag.patient_id,
            "slide_ids": ";".join(s.bag.slide_ids),
            "n_tiles": int(sum(s.bag.lengths)),
            "y_true": s.bag.label,
            "label": run.classes[s.bag.label],
        }
        for name, k in run.poolings.items():
            p = s.probs[name]
            probs = {col: float(v) for col, v in zip(prob_columns(run.classes), p, strict=True)}
            rows.append(base | {"pooling": name, "k": k} | probs | {"pred": run.classes[int(np.argmax(p))]})
    table = pd.DataFrame(rows)
    table["k"] = table["k"].astype("Int64")  # `mean` has no K: an empty cell, not nan
    return table


def fold_outputs(run: ZeroShotRun, table: pd.DataFrame, entry: dict[str, Any]) -> tuple[pd.DataFrame, dict]:
    """A fold's predictions.csv (test bags at the primary pooling) and metrics.json, as a trained fold's."""
    by_pooling = {name: rows.set_index("bag_id") for name, rows in table.groupby("pooling", sort=False)}
    test = [str(b) for b in entry["test"]]
    primary = by_pooling[run.primary].loc[test].reset_index()
    preds = primary[["bag_id", "patient_id", "slide_ids"]].copy()
    preds["index"], preds["seed"], preds["fold"] = entry["index"], entry["seed"], entry["fold"]
    preds = pd.concat([preds, primary[["y_true", "label", *prob_columns(run.classes), "pred", "pooling"]]], axis=1)
    per_pooling = {}
    for name in run.poolings:
        rows = by_pooling[name].loc[test]
        probs = rows[prob_columns(run.classes)].to_numpy(float)
        per_pooling[name] = classification_metrics(rows["y_true"].to_numpy(int), probs, len(run.classes))
    meta = {"task": run.task.name, "index": entry["index"], "seed": entry["seed"], "fold": entry["fold"]}
    fitted_nothing: dict[str, Any] = {
        "n_train": 0,
        "n_val": 0,
        "n_test": len(test),
        "best_epoch": None,
        "epochs_run": 0,
    }
    # what made the fold, as a trained fold records it: the task (prompts, poolings), the prompt hash, the split
    made_of = {"task": run.task.model_dump(mode="json"), "prompts": run.embeddings.prompt_hash, "entry": entry}
    fitted_nothing["settings_key"] = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]
    metrics = (
        per_pooling[run.primary]
        | meta
        | fitted_nothing
        | {"device": "cpu", "history": [], "model": MODEL_NAME, "pooling": run.primary, "poolings": per_pooling}
    )
    return preds, metrics


def tiles_json(run: ZeroShotRun, scored: list[BagScores]) -> dict[str, Any]:
    """Per bag the tiles that drove its prediction; `slides` maps each slide to its bag (the explain page's key)."""
    bags = {}
    for s in scored:
        assert s.bag.label is not None
        bags[s.bag.bag_id] = {
            "patient_id": s.bag.patient_id,
            "slide_ids": s.bag.slide_ids,
            "label": run.classes[s.bag.label],
            "predicted": run.classes[s.predicted],
            "probability": float(s.probs[run.primary][s.predicted]),
            "n_tiles": int(sum(s.bag.lengths)),
            "tiles": s.top_tiles,
        }
    slides = {sid: s.bag.bag_id for s in scored for sid in s.bag.slide_ids}
    return {
        "task": run.task.name,
        "pooling": run.primary,
        "k": run.task.primary_k,
        "score": TILE_SCORE,
        "bags": bags,
        "slides": slides,
    }


def first_seed_tests(splits: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """bag id -> the split of the first seed that tests it (each bag exactly once), as trained attention records."""
    first = splits["seeds"][0]
    return {b: e for e in splits["splits"] if e["seed"] == first for b in e["test"]}


def write_tile_logits(
    run: ZeroShotRun, scores: BagScores, logits: np.ndarray, entry: dict[str, Any], store: ZarrStore, att_dir: Path
) -> None:
    """A bag's per-tile predicted-class logits, split into its slides, where and as trained tasks write attention
    (`entry`: the split testing the bag), so the heatmaps and the explain page need no zero-shot case. Written
    bag by bag while scoring: a cohort's logits never sit in memory together."""
    from ..mil.train import write_attention  # here: mil.train loads torch, which nothing else here needs

    meta = {"task": run.task.name, "index": entry["index"], "seed": entry["seed"], "fold": entry["fold"]}
    extra = {"model": MODEL_NAME, "pooling": run.primary, "predicted": run.classes[scores.predicted]}
    write_attention(att_dir, store, scores.bag, logits, meta | extra | {"score": TILE_SCORE})


def write_zero_shot(run: ZeroShotRun, splits: dict[str, Any], scored: list[BagScores]) -> None:
    """Every file of the task folder but the summaries; each fold's metrics.json last (it marks the fold done)."""
    out = run.out
    write_json_atomic(out / "config.json", run.config())
    table = pooling_table(run, scored)
    (out / ZERO_SHOT_DIR).mkdir(parents=True, exist_ok=True)
    table.to_csv(out / ZERO_SHOT_DIR / "poolings.csv", index=False)
    write_json_atomic(out / ZERO_SHOT_DIR / "tiles.json", tiles_json(run, scored))
    for entry in splits["splits"]:
        fold_dir = out / f"fold{entry['index']:02d}"
        fold_dir.mkdir(exist_ok=True)
        preds, metrics = fold_outputs(run, table, entry)
        preds.to_csv(fold_dir / "predictions.csv", index=False)
        write_json_atomic(fold_dir / "metrics.json", metrics)


def summarize_zero_shot(out_dir: str | Path) -> dict[str, Any]:
    """evaluate_task's summary of the folds (the primary pooling) plus the `zero_shot` section: per pooling the
    fold mean and SE of AUC, accuracy and balanced accuracy, and their value pooled over every bag."""
    out = Path(out_dir)
    summary = evaluate_task(out)
    config = read_json(out / "config.json")
    section = config.get("zero_shot")
    table_path = out / ZERO_SHOT_DIR / "poolings.csv"
    if not isinstance(section, dict) or not table_path.is_file():
        raise ConfigError(f"{out}: not a zero-shot task folder (no zero_shot section or {table_path.name}); run it")
    classes = [str(c) for c in config["classes"]]
    table = pd.read_csv(table_path, dtype={"bag_id": str})
    folds = [read_json(p) for p in sorted(out.glob("fold*/metrics.json"))]
    poolings: dict[str, Any] = {}
    rows = []
    for name in section["pooling_order"]:
        k = section["pooling_k"][name]
        sub = table[table["pooling"] == name]
        pooled = classification_metrics(
            sub["y_true"].to_numpy(int), sub[prob_columns(classes)].to_numpy(float), len(classes)
        )
        poolings[name] = {"k": k}
        for metric in POOLING_METRICS:
            mean, se = mean_se([(f.get("poolings") or {}).get(name, {}).get(metric) for f in folds])
            poolings[name][metric] = {"mean": mean, "se": se, "pooled": pooled[metric]}
            rows.append({"pooling": name, "k": k, "metric": metric} | poolings[name][metric])
    per_pooling = pd.DataFrame(rows)
    per_pooling["k"] = per_pooling["k"].astype("Int64")
    per_pooling.to_csv(out / ZERO_SHOT_DIR / "summary.csv", index=False)
    summary["zero_shot"] = section | {
        "poolings": poolings,
        "tiles": str(out / ZERO_SHOT_DIR / "tiles.json"),
        "table": str(table_path),
    }
    write_json_atomic(out / "summary.json", summary)
    return dict(read_json(out / "summary.json"))
