"""Stage-3 verbs: `train`, `predict`, `bench-mil`, and the per-task workflow jobs `mil-sheet|splits|train|evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, exit_with_error, run_or_exit

ConfigOpt = Annotated[Path, typer.Option(help="YAML config (the workflow passes RESULTS/settings/SCOPE-DIGEST.yaml)")]
TaskOpt = Annotated[str, typer.Option(help="task name from mil.tasks")]


def _mil_section(config: Path) -> dict[str, Any]:
    """The `mil:` section of a pipeline config; a file with top-level `tasks:`/`train:` (older layout) also works."""
    from ..config import read_yaml

    data = read_yaml(config)
    mil = data.get("mil")
    section = mil if isinstance(mil, dict) else data
    return {"tasks": section.get("tasks") or [], "train": section.get("train") or {}}


@app.command()
def train(
    sheet: Annotated[Path, typer.Option(help="sample sheet CSV (slide_id, patient_id, label columns)")],
    features: Annotated[Path, typer.Option(help="folder of per-slide feature stores {slide_id}.zarr")],
    config: Annotated[Path, typer.Option(help="YAML/JSON with a `mil:` section (`tasks: [...]`, `train: {...}`)")],
    out: Annotated[Path, typer.Option(help="output folder; one sub-folder per task")],
    task: Annotated[list[str] | None, typer.Option(help="train only these tasks (default: all)")] = None,
    fold: Annotated[int | None, typer.Option(help="train one split only (index into splits.json)")] = None,
    attention: Annotated[Path | None, typer.Option(help="attention folder (default OUT/TASK/attention)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train attention-MIL models for each task with patient-level cross-validation."""
    from ..errors import PipelineError
    from ..mil.train import train_task

    try:
        section = _mil_section(config)
        train_cfg = dict(section["train"]) | ({"quiet": True} if quiet else {})
        tasks = [t for t in section["tasks"] if not task or t.get("name") in task]
        if not tasks:
            raise PipelineError(f"{config}: no task to train (need `mil: tasks:` with names {task or ''})")
        for t in tasks:
            att = attention / t["name"] if attention else None
            res = train_task(sheet, features, t, train_cfg, out / t["name"], fold=fold, attention_dir=att)
            typer.echo(json.dumps({"task": res["task"], "summary": (res["summary"] or {}).get("metrics")}))
    except PipelineError as exc:
        exit_with_error(exc)


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="a trained fold folder or a task folder (mean over its folds)")],
    features: Annotated[Path, typer.Option(help="folder of per-slide feature stores {slide_id}.zarr")],
    out: Annotated[Path, typer.Option(help="predictions CSV to write")],
    slides: Annotated[list[str] | None, typer.Argument(help="slide ids (default: every store in FEATURES)")] = None,
) -> None:
    """Score slides with trained MIL models."""
    from ..errors import PipelineError
    from ..mil.train import predict as run_predict

    ids = slides or sorted(p.name[: -len(".zarr")] for p in features.glob("*.zarr"))
    try:
        df = run_predict(model, features, ids, out)
    except PipelineError as exc:
        exit_with_error(exc)
    typer.echo(f"wrote {len(df)} predictions to {out}")


@app.command("bench-mil")
def bench_mil(
    csv: Annotated[Path, typer.Argument(help="instances CSV: label,bag_id,features... (no header)")],
    folds: Annotated[int, typer.Option()] = 10,
    repeats: Annotated[int, typer.Option()] = 5,
    model: Annotated[str, typer.Option(help="abmil-gated, abmil, mean or max")] = "abmil-gated",
    seed: Annotated[int, typer.Option()] = 0,
    readout: Annotated[
        str,
        typer.Option(
            help="average: mean of every ensemble member; select: the inner-CV winner's configuration and epoch"
        ),
    ] = "average",
    out_json: Annotated[Path | None, typer.Option(help="also write the full results JSON here")] = None,
) -> None:
    """Classic MIL benchmark (Ilse et al. 2018 protocol); the last line printed is a JSON summary."""
    from ..errors import PipelineError
    from ..mil.bench import bench_mil as run_bench

    try:
        run_bench(csv, folds=folds, repeats=repeats, model=model, seed=seed, readout=readout, out_json=out_json)
    except PipelineError as exc:
        exit_with_error(exc)


@app.command("mil-sheet")
def mil_sheet(config: ConfigOpt, task: TaskOpt) -> None:
    """Write RESULTS/mil/TASK/sheet.csv: the slides with features (excluded ones listed in excluded.csv)."""
    import pandas as pd

    from ..config import load_config
    from ..layout import ResultsLayout
    from ..mil.workflow import describe_targets, write_task_sheet

    cfg = run_or_exit(lambda: load_config(config))
    task_cfg = run_or_exit(lambda: cfg.mil.task(task))
    results = Path(cfg.results)
    sheet = run_or_exit(lambda: write_task_sheet(cfg.cohort(), results, cfg.encoder.name, task_cfg))
    out = ResultsLayout(results).task_dir(task)
    excluded = pd.read_csv(out / "excluded.csv")
    typer.echo(f"{task}: {len(sheet)} slides with features; {len(excluded)} left out (excluded.csv)")
    typer.echo(f"{task}: {run_or_exit(lambda: describe_targets(out / 'sheet.csv', task_cfg))}")


@app.command("mil-splits")
def mil_splits(config: ConfigOpt, task: TaskOpt) -> None:
    """Write RESULTS/mil/TASK/splits.json (patient-level, stratified, repeated over seeds)."""
    from ..config import load_config
    from ..layout import ResultsLayout
    from ..mil.workflow import write_task_splits

    cfg = run_or_exit(lambda: load_config(config))
    out = ResultsLayout(cfg.results).task_dir(task)
    splits = run_or_exit(lambda: write_task_splits(out / "sheet.csv", cfg.mil.task(task), cfg.mil.train, out))
    typer.echo(f"{task}: {len(splits['splits'])} splits")


@app.command("mil-train")
def mil_train(
    config: ConfigOpt, task: TaskOpt, fold: Annotated[int, typer.Option(help="split index (fold x seed), 0-based")]
) -> None:
    """Train one fold of one task (what the Snakemake `mil_train` rule runs)."""
    from ..config import load_config
    from ..layout import ResultsLayout
    from ..mil.train import train_task
    from ..mil.workflow import task_features_dir

    cfg = run_or_exit(lambda: load_config(config))
    layout = ResultsLayout(cfg.results)
    out = layout.task_dir(task)
    task_cfg = run_or_exit(lambda: cfg.mil.task(task))
    res = run_or_exit(
        lambda: train_task(
            out / "sheet.csv",
            task_features_dir(layout.root, cfg.encoder.name, task_cfg),
            task_cfg,
            cfg.mil.train,
            out,
            fold=fold,
            attention_dir=layout.attention_dir(task),
        )
    )
    typer.echo(json.dumps(res["folds"][-1] if res.get("folds") else res, default=str)[:2000])


@app.command("mil-evaluate")
def mil_evaluate(config: ConfigOpt, task: TaskOpt) -> None:
    """Summarise a task's folds (summary.json/csv, figures) and draw its attention heatmaps."""
    from ..config import load_config
    from ..layout import ResultsLayout
    from ..mil.evaluate import evaluate_task
    from ..mil.heatmaps import write_heatmaps

    cfg = run_or_exit(lambda: load_config(config))
    summary = run_or_exit(lambda: evaluate_task(ResultsLayout(cfg.results).task_dir(task)))
    run_or_exit(lambda: write_heatmaps(Path(cfg.results), task, cfg.mil.heatmap_top_k))
    typer.echo(json.dumps(summary, default=str)[:4000])
