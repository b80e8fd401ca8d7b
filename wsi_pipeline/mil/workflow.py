"""Stage 3 as workflow jobs: per task a training sheet of the slides that have features, its splits, one job per
fold, the summary and attention heatmaps. The Snakemake rules in workflows/rules/mil.smk call these through the
`wsi-pipeline mil-*` verbs (cli/mil.py).

Slides that failed stage 1 or 2, or have no tiles, are left out of the training sheet and listed with the reason
in `excluded.csv` beside it: a cohort run trains on what it has instead of stopping (the library's own check,
one error naming every slide without features, still guards direct use of `train_task`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import TrainingDataError
from ..io.jsonio import write_json_atomic
from ..io.small_zarr import read_group_attributes
from ..layout import STATUS_OK, ResultsLayout
from .bags import Bag, ZarrStore, bags_from_sheet, label_strings, load_sheet
from .config import TaskConfig, TrainConfig
from .labels import label_counts
from .splits import task_splits


def write_task_sheet(cohort: pd.DataFrame, results: Path, encoder: str, task: TaskConfig) -> pd.DataFrame:
    """The cohort rows with a target for the task whose slide has a complete, non-empty feature store (and, for a
    concept-bottleneck task, concept scores from its set); every other slide goes to excluded.csv with the reason."""
    layout = ResultsLayout(results)
    concept_set = task.concept_features
    keep, excluded = [], []
    blank = _blank_targets(cohort, task)
    for sid in cohort.index:
        if sid in blank:
            excluded.append({"slide_id": sid, "encode_status": "", "reason": blank[sid]})
            continue
        side = _sidecar(layout.feature_sidecar(encoder, sid))
        status = side.get("status", "not encoded")
        if status == STATUS_OK and concept_set:
            side = _sidecar(layout.concept_sidecar(encoder, concept_set, sid)) or {"status": "not scored"}
            status = side.get("status", "not scored")
        if status == STATUS_OK and int(side.get("n_tiles") or 0) > 0:
            keep.append(sid)
        else:
            reason = side.get("reason") or ("no tiles" if status == STATUS_OK else "")
            excluded.append({"slide_id": sid, "encode_status": status, "reason": reason})
    refuse_unreadable(task_features_dir(results, encoder, task), keep, "cosine" if concept_set else "features")
    out = layout.task_dir(task.name)
    out.mkdir(parents=True, exist_ok=True)
    sheet = cohort.loc[keep].reset_index(drop=True)
    pd.DataFrame(excluded, columns=["slide_id", "encode_status", "reason"]).to_csv(out / "excluded.csv", index=False)
    sheet.to_csv(out / "sheet.csv", index=False)
    features = task_features_dir(results, encoder, task)
    stores = {sid: read_group_attributes(features / f"{sid}.zarr").get("store_id") for sid in keep}
    write_json_atomic(layout.task_features_record(task.name), {"stores": stores})
    return sheet


def refuse_unreadable(features_dir: Path, slide_ids: list[str], array: str, threads: int = 4) -> None:
    """Read every store the task will train on, once, before any fold starts: a damaged chunk or a NaN found in
    epoch 3 of one fold named one slide per job; here every bad store is named in one line. (One full read of the
    task's features, the cost of one training epoch.)"""
    from concurrent.futures import ThreadPoolExecutor

    store = ZarrStore(features_dir, array=array)

    def problem(sid: str) -> str | None:
        try:
            store.load(Bag(sid, [sid]))
        except TrainingDataError as err:
            return f"{sid} ({str(err).removeprefix(str(store.path(sid)) + ': ').split(';')[0]})"
        return None

    with ThreadPoolExecutor(threads) as pool:
        bad = [p for p in pool.map(problem, slide_ids) if p]
    if bad:
        shown = "; ".join(bad[:20]) + (f"; ... ({len(bad)} in all)" if len(bad) > 20 else "")
        raise TrainingDataError(
            f"{features_dir}: {len(bad)} store(s) cannot be trained on: {shown}; re-run their feature extraction "
            "(delete them and run snakemake --forcerun encode) or drop them from the sample sheet"
        )


def _blank_targets(cohort: pd.DataFrame, task: TaskConfig) -> dict[str, str]:
    """Slides whose target cell is empty for this task -> why they are left out (not a silent drop)."""
    columns = [task.time, task.event] if task.type == "survival" else [task.label]
    reasons: dict[str, str] = {}
    for column in columns:
        if column is None or column not in cohort.columns:
            continue  # a missing column is load_sheet's one-line error, naming the sheet's columns
        for sid in cohort.index[cohort[column].isna()]:
            reasons.setdefault(str(sid), f"no value in column {column!r} for task {task.name!r}")
    return reasons


def _sidecar(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def task_features_dir(results: Path, encoder: str, task: TaskConfig) -> Path:
    """Where a task's bags come from: the encoder's feature stores, or a concept set's score stores (a
    concept-bottleneck task, `features: concepts:<set>`)."""
    layout = ResultsLayout(results)
    concept_set = task.concept_features
    return layout.concept_dir(encoder, concept_set) if concept_set else layout.feature_dir(encoder)


def write_task_splits(sheet_csv: Path, task: TaskConfig, train: TrainConfig, out: Path) -> dict[str, Any]:
    """Make (or reuse) the task's patient-level splits once, before the fold jobs start in parallel."""
    df, _ = load_sheet(sheet_csv, task)
    return task_splits(out / "splits.json", bags_from_sheet(df, task), task, train)


def describe_targets(sheet_csv: Path, task: TaskConfig) -> str:
    """What the task will learn from, printed before any training: slides per class, or events per patient (the
    sheet is read as training reads it, so a typo'd label or a one-class task is refused here already)."""
    df, _ = load_sheet(sheet_csv, task)
    if task.type == "survival":
        per_patient = df.groupby("_patient")["_event"].max()
        return f"{int(per_patient.sum())} events among {len(per_patient)} patients ({len(df)} slides)"
    return f"slides per {task.label!r} value: {label_counts(label_strings(df[task.label]))}"
