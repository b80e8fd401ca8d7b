"""One table of every task's headline metric (`results/mil/tasks.csv`): trained, zero-shot and concept-bottleneck
tasks side by side, read from their summary.json and config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..io.atomic import write_bytes_atomic
from ..layout import ResultsLayout

# the metric a task type is compared on (the rest are in its summary.json)
HEADLINE = {"classification": "auc", "zero-shot": "auc", "survival": "c_index"}
COLUMNS = ["task", "type", "features", "model", "metric", "mean", "se", "pooled", "ci_low", "ci_high", "folds"]


def task_row(task_dir: Path) -> dict[str, Any]:
    summary = json.loads((task_dir / "summary.json").read_text())
    config_path = task_dir / "config.json"
    task = json.loads(config_path.read_text()).get("task", {}) if config_path.exists() else {}
    metric = HEADLINE.get(summary.get("type", ""), "auc")
    values = summary.get("metrics", {}).get(metric, {})
    model = summary.get("model")
    zero_shot = summary.get("zero_shot") or {}
    if zero_shot.get("primary_pooling"):
        model = f"{model} ({zero_shot['primary_pooling']})"
    return {
        "task": summary.get("task", task_dir.name),
        "type": summary.get("type"),
        "features": task.get("features", "raw"),
        "model": model,
        "metric": metric,
        **{k: values.get(k) for k in ("mean", "se", "pooled", "ci_low", "ci_high")},
        "folds": f"{summary.get('folds_done')}/{summary.get('folds_total')}",
    }


def write_task_table(results: str | Path, tasks: list[str]) -> pd.DataFrame:
    """`results/mil/tasks.csv` from the tasks' summaries (written atomically); tasks without one are left out."""
    layout = ResultsLayout(results)
    rows = [task_row(layout.task_dir(t)) for t in tasks if (layout.task_dir(t) / "summary.json").is_file()]
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_bytes_atomic(layout.tasks_table, table.to_csv(index=False).encode())
    return table
