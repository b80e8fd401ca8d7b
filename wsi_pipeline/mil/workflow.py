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

from ..layout import STATUS_OK, ResultsLayout
from .bags import bags_from_sheet, load_sheet
from .config import TaskConfig, TrainConfig
from .splits import task_splits


def write_task_sheet(
    cohort: pd.DataFrame, results: Path, encoder: str, task: str, concept_set: str | None = None
) -> pd.DataFrame:
    """The cohort rows whose slide has a complete, non-empty feature store (and, for a concept-bottleneck task,
    concept scores from `concept_set`); the rest go to excluded.csv with the reason."""
    layout = ResultsLayout(results)
    keep, excluded = [], []
    for sid in cohort.index:
        side = _sidecar(layout.feature_sidecar(encoder, sid))
        status = side.get("status", "not encoded")
        if status == STATUS_OK and concept_set:
            side = _sidecar(layout.concept_sidecar(encoder, concept_set, sid)) or {"status": "not scored"}
            status = side.get("status", "not scored")
        if status == STATUS_OK and int(side.get("n_tiles") or 0) > 0:
            keep.append(sid)
        else:
            excluded.append({"slide_id": sid, "encode_status": status, "reason": side.get("reason") or ""})
    out = layout.task_dir(task)
    out.mkdir(parents=True, exist_ok=True)
    sheet = cohort.loc[keep].reset_index(drop=True)
    pd.DataFrame(excluded, columns=["slide_id", "encode_status", "reason"]).to_csv(out / "excluded.csv", index=False)
    sheet.to_csv(out / "sheet.csv", index=False)
    return sheet


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
