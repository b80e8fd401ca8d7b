"""Stage 3 as workflow jobs: per task a training sheet of the slides that have features, its splits, one job per
fold, the summary and attention heatmaps. The Snakemake rules in workflows/rules/mil.smk call these through the
`wsi-pipeline mil-*` verbs.

Slides that failed stage 1 or 2, or have no tiles, are left out of the training sheet and listed with the reason
in `excluded.csv` beside it: a cohort run trains on what it has instead of stopping (the library's own check,
one error naming every slide without features, still guards direct use of `train_task`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from pydantic import BaseModel, ConfigDict, Field

from ..errors import PipelineError, exit_with_error
from ..store import write_json_atomic
from .config import TaskConfig, TrainConfig


class MILConfig(BaseModel):
    """The `mil:` config section: prediction tasks on the sample sheet and how to train them."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskConfig] = Field(default_factory=list, description="no tasks: the workflow stops after encoding")
    train: TrainConfig = Field(default_factory=TrainConfig)
    heatmap_top_k: int = Field(8, ge=0, le=64, description="tiles in each slide's top-attention gallery")

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise PipelineError(f"no task named {name!r} in the mil.tasks config; known: {[t.name for t in self.tasks]}")

    @property
    def n_splits(self) -> int:
        return self.train.folds * len(self.train.seeds)


def task_dir(results: Path, task: str) -> Path:
    return Path(results) / "mil" / task


def write_task_sheet(cohort: pd.DataFrame, results: Path, encoder: str, task: str) -> pd.DataFrame:
    """The cohort rows whose slide has a complete, non-empty feature store; the rest go to excluded.csv."""
    keep, excluded = [], []
    for sid in cohort.index:
        side_path = Path(results) / "features" / encoder / f"{sid}.json"
        side = json.loads(side_path.read_text()) if side_path.exists() else {}
        status = side.get("status", "not encoded")
        if status == "ok" and int(side.get("n_tiles") or 0) > 0:
            keep.append(sid)
        else:
            excluded.append({"slide_id": sid, "encode_status": status, "reason": side.get("reason") or ""})
    out = task_dir(results, task)
    out.mkdir(parents=True, exist_ok=True)
    sheet = cohort.loc[keep].reset_index(drop=True)
    pd.DataFrame(excluded, columns=["slide_id", "encode_status", "reason"]).to_csv(out / "excluded.csv", index=False)
    sheet.to_csv(out / "sheet.csv", index=False)
    return sheet


def write_task_splits(sheet_csv: Path, task: TaskConfig, train: TrainConfig, out: Path) -> dict[str, Any]:
    """Make (or reuse) the task's patient-level splits once, before the fold jobs start in parallel."""
    from .bags import bags_from_sheet, load_sheet
    from .splits import load_or_make_splits

    df, _ = load_sheet(sheet_csv, task)
    bags = bags_from_sheet(df, task)
    strata = [b.label if task.type == "classification" else b.event for b in bags]
    return load_or_make_splits(out / "splits.json", [b.bag_id for b in bags], [b.patient_id for b in bags], strata,
                               train.folds, train.seeds, train.val_fraction, task.type == "survival")


def _rank01(scores: np.ndarray) -> np.ndarray:
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    return ranks / max(len(scores) - 1, 1)


def write_heatmaps(results: Path, task: str, top_k: int) -> dict[str, Any]:
    """Per slide with attention: heatmap over the plain slide thumbnail and a gallery of the top-k tiles (PNGs)."""
    import cv2
    import zarr

    from ..loader import geometry_from_attrs
    from ..qc import write_png
    from ..slide import open_slide
    from ..tiling import read_tile
    from .plots import attention_heatmap

    results = Path(results)
    out = task_dir(results, task) / "heatmaps"
    written = {}
    for att_path in sorted((results / "attention" / task).glob("*.zarr")):
        sid = att_path.stem
        att = zarr.open_group(str(att_path), mode="r")
        scores = np.asarray(att["scores"][...], dtype=np.float64)
        tiles = zarr.open_group(str(results / "tiles" / f"{sid}.zarr"), mode="r")
        attrs = dict(tiles.attrs)
        coords = np.asarray(att["coords"][...]) if "coords" in att else np.asarray(tiles["coords"][...])
        thumb_path = results / "qc" / sid / "thumbnail_plain.png"
        if not thumb_path.exists():  # tiled by an earlier version: the QC thumbnail, drawings and all
            thumb_path = thumb_path.with_name("thumbnail.png")
        thumb = cv2.cvtColor(cv2.imread(str(thumb_path)), cv2.COLOR_BGR2RGB)
        scale = thumb.shape[1] / float(attrs["slide_dimensions"][0])  # thumbnail px per level-0 px
        heat = attention_heatmap(thumb, coords, float(attrs["tile_size_level0"]), scores, scale)
        write_png(out / f"{sid}_heatmap.png", heat)
        entry = {"heatmap": str(out / f"{sid}_heatmap.png"), "n_tiles": int(len(scores))}
        if top_k and len(scores):
            geometry = geometry_from_attrs(attrs)
            mpp = float(attrs["slide_mpp"]) if attrs.get("mpp_source") == "override" else None
            order = np.argsort(-scores, kind="stable")[:top_k]
            with open_slide(attrs["slide_path"], backend=attrs.get("backend", "auto"), mpp=mpp) as slide:
                gallery = [read_tile(slide, coords[i], geometry) for i in order]
            write_png(out / f"{sid}_top{len(order)}.png", np.concatenate(gallery, axis=1))
            entry["top_tiles"] = coords[order].tolist()
            entry["top_scores_rank01"] = _rank01(scores)[order].round(4).tolist()
        written[sid] = entry
    write_json_atomic(out / "index.json", written)
    return written


def _cfg(config: Path) -> Any:
    from ..config import load_config

    return load_config(config)


def _run(fn: Any) -> Any:
    try:
        return fn()
    except PipelineError as err:
        exit_with_error(err)


ConfigOpt = Annotated[Path, typer.Option(help="the run's YAML config (Snakemake writes RESULTS/run_config.yaml)")]
TaskOpt = Annotated[str, typer.Option(help="task name from mil.tasks")]


def mil_sheet_command(config: ConfigOpt, task: TaskOpt) -> None:
    """Write RESULTS/mil/TASK/sheet.csv: the slides with features (excluded ones listed in excluded.csv)."""
    cfg = _cfg(config)
    sheet = _run(lambda: write_task_sheet(cfg.cohort(), Path(cfg.results), cfg.encoder.name, cfg.mil.task(task).name))
    typer.echo(f"{task}: {len(sheet)} slides with features")


def mil_splits_command(config: ConfigOpt, task: TaskOpt) -> None:
    """Write RESULTS/mil/TASK/splits.json (patient-level, stratified, repeated over seeds)."""
    cfg = _cfg(config)
    out = task_dir(Path(cfg.results), task)
    splits = _run(lambda: write_task_splits(out / "sheet.csv", cfg.mil.task(task), cfg.mil.train, out))
    typer.echo(f"{task}: {len(splits['splits'])} splits")


def mil_train_command(config: ConfigOpt, task: TaskOpt,
                      fold: Annotated[int, typer.Option(help="split index (fold x seed), 0-based")]) -> None:
    """Train one fold of one task (what the Snakemake `mil_train` rule runs)."""
    from .train import train_task

    cfg = _cfg(config)
    results = Path(cfg.results)
    out = task_dir(results, task)
    res = _run(lambda: train_task(out / "sheet.csv", results / "features" / cfg.encoder.name, cfg.mil.task(task),
                                  cfg.mil.train, out, fold=fold, attention_dir=results / "attention" / task))
    typer.echo(json.dumps(res["folds"][-1] if res.get("folds") else res, default=str)[:2000])


def mil_evaluate_command(config: ConfigOpt, task: TaskOpt) -> None:
    """Summarise a task's folds (summary.json/csv, figures) and draw its attention heatmaps."""
    from .evaluate import evaluate_task

    cfg = _cfg(config)
    out = task_dir(Path(cfg.results), task)
    summary = _run(lambda: evaluate_task(out))
    _run(lambda: write_heatmaps(Path(cfg.results), task, cfg.mil.heatmap_top_k))
    typer.echo(json.dumps(summary, default=str)[:4000])
