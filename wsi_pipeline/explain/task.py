"""Stage 4 for one trained task: `explain_task` reads every test slide's attention (RESULTS/attention/{task}), its
concept scores (RESULTS/explain/{encoder}/{set}) and its fold's prediction, and writes under mil/{task}/explain/:

  slides/{slide}.json   label, prediction, fold, per concept set the weighted / mean / enrichment profiles and top
                        concepts, the top-attention tiles with their concepts (and captions when given)
  concepts.csv          per concept set x contrast x concept: Cliff's delta [bootstrap CI], Mann-Whitney p, BH q
  figures/, tiles/      heatmaps (attention beside the top concepts) and crops of the top tiles, PNG
  index.html            the page a person reads

A zero-shot task (explain/zero_shot.py) writes its tiles' predicted-class logits where trained tasks write
attention; their softmax over the slide stands in for attention, and the task is explained like a classification.
Every file is written atomically; a rerun replaces them and removes those of slides no longer explained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, TrainingDataError
from ..io.atomic import is_temporary
from ..io.jsonio import to_jsonable, write_json_atomic
from ..layout import ResultsLayout
from ..mil.config import TaskConfig
from .config import ExplainConfig
from .figures import load_slide_picture, write_slide_figures, write_tile_crops
from .page import write_page
from .profiles import (
    HIGH,
    LOW,
    TOP_CONCEPTS,
    Attention,
    SetProfile,
    attention_weights,
    concept_table,
    holds_logits,
    profile_set,
    read_attention,
    top_tiles,
    write_csv_atomic,
)
from .store import read_concept_scores

log = logging.getLogger(__name__)

# what the per-tile weights are (a slide JSON's `attention`), by whether the store holds logits
ATTENTION_KINDS = {False: "attention of the fold's model", True: "softmax over the slide of zero-shot tile logits"}


def slide_predictions(task_dir: Path, task_type: str) -> pd.DataFrame:
    """Every fold's test predictions, one row per slide, indexed by (fold index, slide id), with `group`: the true
    class, or for survival predicted high / low risk (above / at most the median of the fold's predicted risks:
    each fold's model has its own risk scale, as in the task's summary)."""
    files = sorted(task_dir.glob("fold*/predictions.csv"))
    if not files:
        raise TrainingDataError(f"{task_dir}: no fold predictions (fold*/predictions.csv); train the task first")
    df = pd.concat(
        [pd.read_csv(f, dtype={"bag_id": str, "patient_id": str, "slide_ids": str, "label": str}) for f in files],
        ignore_index=True,
    )
    if task_type == "survival":
        high = df.groupby("index")["risk"].transform(lambda s: s > s.median()).to_numpy(bool)
        df["group"] = np.where(high, HIGH, LOW)
    else:
        df["group"] = df["label"].astype(str)
    df["slide_id"] = df["slide_ids"].str.split(";")
    return df.explode("slide_id").set_index(["index", "slide_id"])


def task_classes(task_dir: Path, task: TaskConfig, preds: pd.DataFrame) -> list[str]:
    """Class names in the model's output order: the training config's, else the task's, else the prob_ columns."""
    config = task_dir / "config.json"
    if config.exists():
        classes = json.loads(config.read_text()).get("classes")
        if classes:
            return [str(c) for c in classes]
    if task.classes:
        return [str(c) for c in task.classes]
    return [c.removeprefix("prob_") for c in preds.columns if c.startswith("prob_")]


def slide_record(sid: str, task: TaskConfig, attrs: dict[str, Any], row: pd.Series, classes: list[str]) -> dict:
    """What the page and JSON say about a slide apart from its concepts: label, prediction, fold, group."""
    record: dict[str, Any] = {
        "slide_id": sid,
        "task": task.name,
        "type": task.type,
        "bag_id": str(row["bag_id"]),
        "patient_id": str(row.get("patient_id") or row["bag_id"]),
        "fold": {k: attrs.get(k) for k in ("index", "seed", "fold")},
        "group": str(row["group"]),
    }
    if task.type == "survival":
        record |= {"time": float(row["time"]), "event": int(row["event"]), "label": None}
        record["prediction"] = {"risk": float(row["risk"]), "risk_group": str(row["group"])}
    else:
        record["label"] = str(row["label"])
        record["prediction"] = {"class": str(row["pred"]), "probs": {c: float(row[f"prob_{c}"]) for c in classes}}
    return record


def remove_stale(folder: Path, keep: set[Path], pattern: str) -> None:
    """Files of an earlier run for slides no longer explained (or pictures no longer drawn)."""
    for path in folder.glob(pattern) if folder.is_dir() else []:
        if path not in keep and not is_temporary(path):
            path.unlink(missing_ok=True)


def explain_slide(
    layout: ResultsLayout,
    out: Path,
    sid: str,
    attention: tuple[Attention, Path],
    encoder_name: str,
    concept_sets: list[str],
    cfg: ExplainConfig,
    captions: dict[str, list[str]] | None,
) -> tuple[dict[str, Any], dict[str, SetProfile]]:
    """One slide's profiles per set, top tiles, heatmaps and tile crops: its JSON record (plain values, less the
    label and prediction) and its profiles."""
    att, att_path = attention
    logits = holds_logits(att.attrs)
    weights = attention_weights(att.scores, att_path, logits=logits)
    sets, coords = {}, att.coords
    for name in concept_sets:
        path = layout.concept_store(encoder_name, name, sid)
        scores = read_concept_scores(path)
        sets[name] = profile_set(name, weights, att, att_path, scores, path)
        coords = scores.coords if coords is None else coords  # no coords in the attention: the stores' order
    assert coords is not None
    record: dict[str, Any] = {"n_tiles": len(weights), "attention": ATTENTION_KINDS[logits]}
    record["concept_sets"] = {n: p.to_json(TOP_CONCEPTS) for n, p in sets.items()}
    record["top_tiles"] = top_tiles(weights, coords, sets, cfg.top_k_tiles, (captions or {}).get(sid))
    picture = load_slide_picture(layout, sid)
    label = "tile logit (zero-shot)" if logits else "attention"
    record["figures"] = write_slide_figures(picture, sid, coords, weights, sets, cfg.heatmap_concepts, out, label)
    top_xy = np.array([[t["x"], t["y"]] for t in record["top_tiles"]], dtype=np.int64).reshape(-1, 2)
    record["tile_images"], missing = write_tile_crops(picture, sid, top_xy, out)
    if missing:
        record["tile_images_missing"] = missing
    return to_jsonable(record), sets  # plain JSON values: the page reads what the file says


def top_tile_captions(results: Path, task_name: str, cfg: ExplainConfig, device: str = "cpu") -> dict[str, list[str]]:
    """slide id -> captions of its `captioner.tiles_per_slide` highest-attention tiles, highest first (the order
    `profiles.top_tiles` lists them in); empty without `explain.captioner`."""
    if cfg.captioner is None:
        return {}
    from .captions import build_captioner, caption_slide_tiles

    layout = ResultsLayout(results)
    captioner = build_captioner(cfg.captioner, device)
    att_dir = layout.attention_dir(task_name)
    out: dict[str, list[str]] = {}
    for path in sorted(p for p in att_dir.glob("*.zarr") if not is_temporary(p)) if att_dir.is_dir() else []:
        att = read_attention(path)
        if att.coords is None:
            continue
        order = np.argsort(-att.scores, kind="stable")[: cfg.captioner.tiles_per_slide]
        sid = path.name.removesuffix(".zarr")
        out[sid] = caption_slide_tiles(captioner, layout.tile_store(sid), att.coords[order])
    return out


def explain_task(
    results: Path,
    task: TaskConfig,
    encoder_name: str,
    concept_sets: list[str],
    cfg: ExplainConfig,
    captions: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Explain every slide a test fold of `task` scored (its attention store exists) with the concept stores of
    `encoder_name` x `concept_sets` (set names, as the stores are keyed); write the task's explain folder.
    `captions`: slide id -> captions of its top-attention tiles, highest first. Returns a small summary."""
    layout = ResultsLayout(results)
    if not concept_sets:
        raise ConfigError("no concept sets to explain with; list at least one in explain.concept_sets")
    att_dir = layout.attention_dir(task.name)
    att_paths = sorted(p for p in att_dir.glob("*.zarr") if not is_temporary(p)) if att_dir.is_dir() else []
    if not att_paths:
        raise TrainingDataError(f"{att_dir}: no attention stores; train task {task.name!r} (wsi-pipeline mil-train)")
    task_dir = layout.task_dir(task.name)
    preds = slide_predictions(task_dir, task.type)
    classes = task_classes(task_dir, task, preds)
    out = layout.task_explain_dir(task.name)
    records: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, SetProfile]] = {}
    written: set[Path] = set()
    for att_path in att_paths:
        sid = att_path.name.removesuffix(".zarr")
        att = read_attention(att_path)
        key = (att.attrs.get("index"), sid)
        if key not in preds.index:
            raise TrainingDataError(
                f"{att_path}: fold {key[0]} has no prediction for {sid} in {task_dir}/fold*/predictions.csv; the "
                f"attention is from an earlier training: delete {att_dir} and the task's fold folders, then retrain"
            )
        row = preds.loc[key]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        record, sets = explain_slide(layout, out, sid, (att, att_path), encoder_name, concept_sets, cfg, captions)
        record = slide_record(sid, task, att.attrs, row, classes) | record
        write_json_atomic(out / "slides" / f"{sid}.json", record)
        written |= {out / r for r in [f"slides/{sid}.json", *record["figures"].values(), *record["tile_images"]]}
        records.append(record)
        # the cohort table needs the profiles only: the tile x concept scores go once the pictures are drawn
        profiles[sid] = {n: dataclasses.replace(p, tile_scores=p.tile_scores[:0]) for n, p in sets.items()}
    table = concept_table(records, profiles, task.type, classes, cfg.bootstrap, cfg.fdr)
    write_csv_atomic(out / "concepts.csv", table)
    for folder, pattern in (("slides", "*.json"), ("figures", "*.png"), ("tiles", "*.png")):
        remove_stale(out / folder, written, pattern)
    meta = {"encoder": encoder_name, "concept_sets": concept_sets, "fdr": cfg.fdr, "bootstrap": cfg.bootstrap}
    page = write_page(out, task.name, task.type, records, table, meta)
    log.info("explain %s: %d slides, %d significant concept rows", task.name, len(records), table["significant"].sum())
    return {
        "task": task.name,
        "n_slides": len(records),
        "concept_sets": list(concept_sets),
        "n_significant": int(table["significant"].sum()),
        "significant": table.loc[
            table["significant"], ["concept_set", "contrast", "concept", "cliffs_delta", "q"]
        ].to_dict("records"),
        "explain_dir": str(out),
        "concepts_csv": str(out / "concepts.csv"),
        "page": str(page),
    }
