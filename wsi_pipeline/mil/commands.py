"""Typer commands for stage 3; the root CLI registers them (`app.command("train")(train)`, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..errors import PipelineError, exit_with_error


def _load_config(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def train(
    sheet: Path = typer.Option(..., help="sample sheet CSV (slide_id, patient_id, label columns)"),
    features: Path = typer.Option(..., help="folder of per-slide feature stores {slide_id}.zarr"),
    config: Path = typer.Option(..., help="YAML/JSON with `tasks: [...]` and optional `train: {...}`"),
    out: Path = typer.Option(..., help="output folder; one sub-folder per task"),
    task: list[str] = typer.Option(None, help="train only these tasks (default: all)"),
    fold: int | None = typer.Option(None, help="train one split only (index into splits.json)"),
    attention: Path | None = typer.Option(None, help="attention folder (default OUT/TASK/attention)"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Train attention-MIL models for each task with patient-level cross-validation."""
    from .train import train_task

    cfg = _load_config(config)
    train_cfg = dict(cfg.get("train") or {}) | ({"quiet": True} if quiet else {})
    tasks = [t for t in cfg.get("tasks", []) if not task or t.get("name") in task]
    if not tasks:
        typer.echo(f"error: {config}: no task to train (need `tasks:` with names {task or ''})", err=True)
        raise typer.Exit(code=1)
    try:
        for t in tasks:
            att = attention / t["name"] if attention else None
            res = train_task(sheet, features, t, train_cfg, out / t["name"], fold=fold, attention_dir=att)
            typer.echo(json.dumps({"task": res["task"], "summary": (res["summary"] or {}).get("metrics")}))
    except PipelineError as exc:
        exit_with_error(exc)


def predict(
    model: Path = typer.Option(..., help="a trained fold folder or a task folder (mean over its folds)"),
    features: Path = typer.Option(..., help="folder of per-slide feature stores {slide_id}.zarr"),
    out: Path = typer.Option(..., help="predictions CSV to write"),
    slides: list[str] = typer.Argument(None, help="slide ids (default: every store in FEATURES)"),
) -> None:
    """Score slides with trained MIL models."""
    from .train import predict as run_predict

    ids = slides or sorted(p.name[: -len(".zarr")] for p in features.glob("*.zarr"))
    try:
        df = run_predict(model, features, ids, out)
    except PipelineError as exc:
        exit_with_error(exc)
    typer.echo(f"wrote {len(df)} predictions to {out}")


def bench_mil(
    csv: Path = typer.Argument(..., help="instances CSV: label,bag_id,features... (no header)"),
    folds: int = typer.Option(10),
    repeats: int = typer.Option(5),
    model: str = typer.Option("abmil-gated", help="abmil-gated, abmil, mean or max"),
    seed: int = typer.Option(0),
    readout: str = typer.Option("average", help="average: mean of every ensemble member; select: the inner-CV "
                                "winner's configuration and epoch"),
    out_json: Path | None = typer.Option(None, help="also write the full results JSON here"),
) -> None:
    """Classic MIL benchmark (Ilse et al. 2018 protocol); the last line printed is a JSON summary."""
    from .bench import bench_mil as run_bench

    try:
        run_bench(csv, folds=folds, repeats=repeats, model=model, seed=seed, readout=readout, out_json=out_json)
    except PipelineError as exc:
        exit_with_error(exc)
