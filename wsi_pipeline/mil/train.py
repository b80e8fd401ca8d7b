"""Cohort training: one task, k-fold x seeds, per-fold outputs on disk; prediction with saved models.

Layout under `out_dir`: config.json, splits.json, fold{NN}/ (model.safetensors + model.json, predictions.csv,
metrics.json) and the summary written by `evaluate_task`. A fold folder is published whole (one rename) and records
the key of what made it (`fold_key`): a rerun skips a fold with the same key, so an error later never costs the folds
already trained, and retrains one made with other settings or another split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, TrainingDataError
from ..io.atomic import atomic_group, publish, temporary_name
from ..io.jsonio import to_jsonable, write_json_atomic
from .bags import Bag, ZarrStore, bag_strata, bags_from_sheet, load_sheet
from .config import TaskConfig, TrainConfig, as_task, as_train
from .engine import Problem, fit, make_model, model_spec, predict_bags, resolve_device
from .losses import time_bins
from .metrics import classification_metrics, survival_metrics
from .splits import task_splits


def make_problem(task: TaskConfig, cfg: TrainConfig, classes: list[str] | None, train: list[Bag]) -> Problem:
    """Output size and loss for a task, with class weights / time bins from the training bags only."""
    if task.type == "classification":
        assert classes is not None
        counts = np.bincount(bag_strata(train, classification=True), minlength=len(classes)).astype(float)
        weight = None
        if cfg.class_weights:
            weight = np.where(counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0).tolist()
        return Problem("classification", "ce", len(classes), classes, class_weight=weight)
    if cfg.survival_loss == "cox":
        return Problem("survival", "cox", 1)
    edges = time_bins(np.array([b.time for b in train]), np.array([b.event for b in train]), cfg.n_bins)
    return Problem("survival", "nll", len(edges) + 1, edges=edges.tolist())


def save_checkpoint(
    fold_dir: Path, model: torch.nn.Module, spec: dict[str, Any], problem: Problem, meta: dict[str, Any]
) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(fold_dir / "model.safetensors"))
    write_json_atomic(fold_dir / "model.json", {"spec": spec, "problem": problem.to_dict(), **meta})


def load_checkpoint(fold_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Problem, dict]:
    """Rebuild a model from model.json and load its weights from model.safetensors."""
    fold_dir = Path(fold_dir)
    try:
        meta = json.loads((fold_dir / "model.json").read_text())
        state = load_file(str(fold_dir / "model.safetensors"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{fold_dir}: no model.json/model.safetensors; point to a trained fold folder") from exc
    model = make_model(meta["spec"])
    model.load_state_dict(state)
    p = meta["problem"]
    problem = Problem(p["kind"], p["loss"], p["n_out"], p.get("classes"), p.get("edges") or [], p.get("class_weight"))
    return model.to(device).eval(), problem, meta


def _prediction_rows(bags: list[Bag], scores: np.ndarray, problem: Problem, entry: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "bag_id": [b.bag_id for b in bags],
            "patient_id": [b.patient_id for b in bags],
            "slide_ids": [";".join(b.slide_ids) for b in bags],
        }
    )
    df["index"], df["seed"], df["fold"] = entry["index"], entry["seed"], entry["fold"]
    if problem.kind == "classification":
        assert problem.classes is not None
        labels = bag_strata(bags, classification=True)
        df["y_true"] = labels
        df["label"] = [problem.classes[y] for y in labels]
        for i, name in enumerate(problem.classes):
            df[f"prob_{name}"] = scores[:, i]
        df["pred"] = [problem.classes[i] for i in scores.argmax(1)]
    else:
        df["time"], df["event"] = [b.time for b in bags], [b.event for b in bags]
        df["risk"] = scores
    return df


def fold_metrics(df: pd.DataFrame, problem: Problem) -> dict[str, Any]:
    if problem.kind == "classification":
        probs = df[[c for c in df.columns if c.startswith("prob_")]].to_numpy()
        return classification_metrics(df["y_true"].to_numpy(), probs, problem.n_out)
    return survival_metrics(df["time"].to_numpy(), df["event"].to_numpy(), df["risk"].to_numpy())


def write_attention(att_dir: Path, store: ZarrStore, bag: Bag, scores: np.ndarray, meta: dict[str, Any]) -> None:
    """Per-tile attention of one bag, split back into its slides: att_dir/{slide_id}.zarr (scores, coords)."""
    start = 0
    for sid, n in zip(bag.slide_ids, bag.lengths, strict=True):
        with atomic_group(att_dir / f"{sid}.zarr") as group:  # readers never see half a store
            group.create_array("scores", data=np.asarray(scores[start : start + n], dtype=np.float32))
            try:
                group.create_array("coords", data=store.coords(sid).astype(np.int64))
            except KeyError:  # a feature store without coords: scores stay usable in tile order
                pass
            group.update_attributes(to_jsonable({**meta, "slide_id": sid, "bag_id": bag.bag_id}))
        start += n


def fold_key(task: TaskConfig, cfg: TrainConfig, splits: dict[str, Any], entry: dict[str, Any]) -> str:
    """What made a fold: the task, the training settings (but the ones that only say how to show progress) and
    its split. A fold folder recording another key is retrained, not reused."""
    train = cfg.model_dump(mode="json", exclude={"quiet", "loader_threads", "num_threads", "cache_bytes"})
    payload = {"task": task.model_dump(mode="json"), "train": train, "splits": splits["fingerprint"], "entry": entry}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _finished_fold(fold_dir: Path, key: str) -> dict[str, Any] | None:
    try:
        metrics = json.loads((fold_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("settings_key") == key else None


def train_task(
    sheet_csv: str | Path,
    features_dir: str | Path,
    task_cfg: TaskConfig | dict[str, Any],
    train_cfg: TrainConfig | dict[str, Any] | None,
    out_dir: str | Path,
    fold: int | None = None,
    attention_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train one task with cross-validation; `fold` picks one split (index into splits.json) or all (None).

    Attention of each test bag (first seed's splits) goes to `attention_dir` (default out_dir/attention), e.g.
    RESULTS/attention/{task}. Returns {"task", "out_dir", "folds": [per-fold metrics], "summary": ... | None}.
    """
    task, cfg = as_task(task_cfg), as_train(train_cfg)
    if task.type == "survival" and cfg.survival_loss == "cox" and cfg.batch_size < 2:
        raise ConfigError("the Cox loss compares patients within a batch; set batch_size >= 8 for survival_loss cox")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df, classes = load_sheet(sheet_csv, task)
    bags = bags_from_sheet(df, task)
    if not bags:
        raise TrainingDataError(f"{sheet_csv}: no rows with a target for task {task.name!r}")
    # a concept-bottleneck task reads the concept-score stores' `cosine` (features_dir is then their folder)
    store = ZarrStore(features_dir, cfg.cache_bytes, array="cosine" if task.concept_features else "features")
    store.check(bags)  # every missing store listed at once, before any training
    splits = task_splits(out / "splits.json", bags, task, cfg)
    write_json_atomic(
        out / "config.json",
        {
            "task": task.model_dump(),
            "train": cfg.model_dump(),
            "classes": classes,
            "sheet": str(sheet_csv),
            "features_dir": str(features_dir),
        },
    )
    by_id = {b.bag_id: b for b in bags}
    n_splits = len(splits["splits"])
    if fold is not None and not 0 <= fold < n_splits:
        raise ConfigError(f"fold {fold} out of range: {out / 'splits.json'} has folds 0..{n_splits - 1}")
    att_dir = Path(attention_dir) if attention_dir else out / "attention"
    device = resolve_device(cfg.device)
    results = []
    for entry in splits["splits"] if fold is None else [splits["splits"][fold]]:
        fold_dir = out / f"fold{entry['index']:02d}"
        key = fold_key(task, cfg, splits, entry)
        done = _finished_fold(fold_dir, key)
        if done is not None:  # done in an earlier run, with these settings and this split
            results.append(done)
            continue
        train, val, test = ([by_id[i] for i in entry[k]] for k in ("train", "val", "test"))
        problem = make_problem(task, cfg, classes, train)
        spec = model_spec(cfg, store.dim, problem)
        fold_cfg = cfg.model_copy(update={"seed": cfg.seed + entry["index"]})
        label = f"{task.name} fold {entry['index'] + 1}/{n_splits}"
        model, info = fit(spec, store, train, val, problem, fold_cfg, label=label)
        pred = predict_bags(
            model, store, test, problem, device, attention=True, amp=cfg.amp, threads=cfg.loader_threads
        )
        meta = {"task": task.name, "index": entry["index"], "seed": entry["seed"], "fold": entry["fold"]}
        if entry["seed"] == splits["seeds"][0]:
            att_dir.mkdir(parents=True, exist_ok=True)
            for bag, scores in zip(test, pred["attention"], strict=True):
                write_attention(att_dir, store, bag, scores, meta | {"model": cfg.model})
        # the fold is written beside its final place and published in one rename: a job killed at any point
        # leaves no fold folder that looks finished, and a rerun trains it again
        tmp = temporary_name(fold_dir)
        tmp.mkdir()
        table = _prediction_rows(test, pred["scores"], problem, entry)
        table.to_csv(tmp / "predictions.csv", index=False)
        features = {"features": task.features, "array": store.array, "in_dim": store.dim}
        save_checkpoint(tmp, model, spec, problem, meta | features | {"best_epoch": info["best_epoch"]})
        metrics = (
            fold_metrics(table, problem)
            | meta
            | {
                "n_train": len(train),
                "n_val": len(val),
                "n_test": len(test),
                "best_epoch": info["best_epoch"],
                "epochs_run": len(info["history"]),
                "device": info["device"],
                "settings_key": key,
                "history": info["history"],
            }
        )
        write_json_atomic(tmp / "metrics.json", metrics)
        publish(tmp, fold_dir, overwrite=True)
        results.append(to_jsonable(metrics))
    summary = None
    if fold is None:
        from .evaluate import evaluate_task

        summary = evaluate_task(out)
    return {"task": task.name, "out_dir": str(out), "folds": results, "summary": summary}


def predict(
    model_dir: str | Path, features_dir: str | Path, slide_ids: list[str], out_csv: str | Path, device: str = "auto"
) -> pd.DataFrame:
    """Score slides with a trained fold (folder with model.json) or the mean over all folds of a task folder."""
    model_dir = Path(model_dir)
    dirs = (
        [model_dir]
        if (model_dir / "model.json").exists()
        else sorted(p.parent for p in model_dir.glob("fold*/model.json"))
    )
    if not dirs:
        config = _read_json(model_dir / "config.json")
        if (config.get("task") or {}).get("type") == "zero-shot":
            raise ConfigError(
                f"{model_dir}: a zero-shot task has no trained model to apply; score new slides with "
                "`wsi-pipeline zero-shot` on a config listing them"
            )
        raise ConfigError(f"{model_dir}: no trained model (model.json) here or in fold*/; train the task first")
    meta = _read_json(dirs[0] / "model.json")  # every fold of a task learnt from the same features
    array = meta.get("array") or "features"
    store = ZarrStore(features_dir, array=array)
    bags = [Bag(s, [s]) for s in slide_ids]
    try:
        store.check(bags)
    except TrainingDataError as err:
        if array == "cosine":  # a concept bottleneck reads concept scores, not the encoder's features
            raise TrainingDataError(
                f"{err}; this model learnt from concept scores ({meta.get('features')}): pass --features "
                "RESULTS/explain/ENCODER/SET, the folder of that set's score stores"
            ) from None
        raise
    want = int(meta["spec"]["in_dim"])
    if store.dim != want:
        what = "concept scores" if array == "cosine" else "features"
        raise TrainingDataError(
            f"{features_dir}: {what} are {store.dim}-d but the model in {dirs[0]} was trained on {want}-d "
            f"{what} ({meta.get('features') or 'raw'}); use {what} from the encoder (and concept set) it was "
            "trained on"
        )
    dev = resolve_device(device)
    scores, problem = [], None
    for d in dirs:
        model, problem, _ = load_checkpoint(d, str(dev))
        scores.append(predict_bags(model, store, bags, problem, dev)["scores"])
    mean = np.mean(scores, axis=0)
    assert problem is not None
    df = pd.DataFrame({"slide_id": list(slide_ids)})
    if problem.kind == "classification":
        for i, name in enumerate(problem.classes or []):
            df[f"prob_{name}"] = mean[:, i]
        df["pred"] = [problem.classes[i] for i in mean.argmax(1)] if problem.classes else mean.argmax(1)
    else:
        df["risk"] = mean
    df["n_models"] = len(dirs)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False)
    return df


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); retrain the task to write it again") from None
    return data if isinstance(data, dict) else {}
