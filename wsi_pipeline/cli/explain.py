"""Stage-4 verbs: `concepts` (tile concept scores over a cohort's features), `zero-shot` (an MI-Zero task) and
`explain` (a MIL task's concept explanation and page). Each does what its Snakemake rule in explain.smk runs."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from .app import app, exit_with_error, run_or_exit

ConfigOpt = Annotated[Path, typer.Option(help="YAML config (the workflow passes RESULTS/settings/SCOPE-DIGEST.yaml)")]
TaskOpt = Annotated[str, typer.Option(help="task name from mil.tasks")]


def _text_device(requested: str) -> str:
    from ..devices import resolve_device

    return str(resolve_device(requested))


@app.command("zero-shot")
def zero_shot(config: ConfigOpt, task: TaskOpt) -> None:
    """Score a zero-shot task (type: zero-shot): MI-Zero pooling of tile-class similarities, no training; writes
    RESULTS/mil/TASK like a trained task (folds, summary.json with a zero_shot section) and its heatmaps."""
    from ..config import load_config
    from ..encoders.text import build_text_encoder
    from ..explain.zero_shot import run_zero_shot_task, zero_shot_embeddings
    from ..layout import ResultsLayout
    from ..mil.heatmaps import write_heatmaps

    cfg = run_or_exit(lambda: load_config(config))
    layout = ResultsLayout(cfg.results)
    task_cfg = run_or_exit(lambda: cfg.mil.task(task))
    if task_cfg.type != "zero-shot":
        exit_with_error(f"task {task!r} is a {task_cfg.type} task; zero-shot scores only tasks with type: zero-shot")
    text = run_or_exit(lambda: build_text_encoder(cfg.encoder, _text_device(cfg.encode.device)))
    emb = run_or_exit(lambda: zero_shot_embeddings(task_cfg, text, layout.text_cache_dir(cfg.encoder.name)))
    summary = run_or_exit(lambda: run_zero_shot_task(layout.root, task_cfg, cfg.mil.train, cfg.encoder.name, emb))
    run_or_exit(lambda: write_heatmaps(layout.root, task, cfg.mil.heatmap_top_k))
    typer.echo(json.dumps({"task": task, "metrics": summary.get("metrics")}, default=str)[:4000])


@app.command("explain")
def explain(config: ConfigOpt, task: TaskOpt) -> None:
    """Explain a task in concepts: per slide the attention-weighted concept profile and top tiles, per concept the
    contrast between classes (or risk groups), heatmaps and RESULTS/mil/TASK/explain/index.html."""
    from ..config import load_config
    from ..explain.concepts import load_concept_sets
    from ..explain.task import explain_task, top_tile_captions
    from ..layout import ResultsLayout

    cfg = run_or_exit(lambda: load_config(config))
    if cfg.explain is None:
        exit_with_error(f"{config}: no explain: section; add one (see workflows/config.yaml) to explain tasks")
    explain_cfg = cfg.explain
    task_cfg = run_or_exit(lambda: cfg.mil.task(task))
    sets = run_or_exit(lambda: load_concept_sets(explain_cfg.concept_sets))
    root = ResultsLayout(cfg.results).root
    captions = run_or_exit(lambda: top_tile_captions(root, task, explain_cfg, _text_device(cfg.encode.device)))
    summary = run_or_exit(
        lambda: explain_task(root, task_cfg, cfg.encoder.name, [s.name for s in sets], explain_cfg, captions)
    )
    typer.echo(json.dumps(summary, default=str)[:4000])


@app.command("concepts")
def concepts(
    config: ConfigOpt,
    concept_set: Annotated[
        list[str] | None,
        typer.Option(help="a shipped set name or YAML path (repeatable; default: every set of explain.concept_sets)"),
    ] = None,
    slide: Annotated[list[str] | None, typer.Option(help="score only these slide ids (default: the cohort)")] = None,
    force: Annotated[bool, typer.Option(help="score again even where a matching store exists")] = False,
) -> None:
    """Score the stored tile features against concept sets: RESULTS/explain/ENCODER/SET/{slide}.zarr (cosine and
    softmax per tile and concept) and cohort.csv; the features are checked once against the model's own logits."""
    from ..config import load_config
    from ..encoders.text import build_text_encoder
    from ..explain.concepts import load_concept_sets
    from ..explain.config import ConceptSet, ExplainConfig
    from ..explain.feature_check import cohort_feature_check
    from ..explain.scores import score_cohort
    from ..explain.text_cache import concept_embeddings
    from ..layout import ResultsLayout

    cfg = run_or_exit(lambda: load_config(config))
    explain_cfg = cfg.explain or ExplainConfig()
    sets = run_or_exit(lambda: load_concept_sets(concept_set or explain_cfg.concept_sets))
    layout = ResultsLayout(cfg.results)
    slide_ids = slide or run_or_exit(lambda: list(cfg.cohort().index))
    device = _text_device(cfg.encode.device)
    text = run_or_exit(lambda: build_text_encoder(cfg.encoder, device))

    def score(concept_set: ConceptSet) -> str:
        emb = concept_embeddings(text, concept_set, layout.text_cache_dir(cfg.encoder.name))
        check = cohort_feature_check(layout.root, cfg.encoder, slide_ids, emb, device=device)
        table = score_cohort(
            layout.root,
            cfg.encoder.name,
            slide_ids,
            emb,
            chunk_rows=explain_cfg.chunk_rows,
            force=force,
            feature_check=check,
        )
        counts = table["status"].value_counts().to_dict()
        return f"{concept_set.name}: {len(table)} slides {counts}; feature check {check.status}"

    for s in sets:
        typer.echo(run_or_exit(functools.partial(score, s)))
