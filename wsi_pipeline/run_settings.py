"""Run settings snapshots: the settings a workflow job reads, frozen per scope, never the live config.

Every Snakemake invocation composes the config anew (workflows/config.yaml + --configfile + --config). A job that
read one file rewritten at every parse took the settings of whichever invocation parsed last: a dry run with
another --configfile in the middle of a run retrained the running folds with its epochs. So each job reads

    RESULTS/settings/{scope}-{digest}.yaml

holding only what its scope uses (`tile`, `encode`, `concepts-SET`, `task-TASK`, `explain-TASK`), named by the
SHA-256 of its text, written once by the workflow's `run_settings` rule (a dry run writes nothing) and never
rewritten. The snapshot is an input of the scope's jobs, so changing what they use, and only that, redoes them with
or without `.snakemake/metadata` (a new snapshot is newer than every output made before it). `prune_superseded`
removes a scope's earlier snapshots when a run starts, so returning to earlier settings redoes the work too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .config import SNAPSHOT_HEADER, PipelineConfig, write_config_text
from .errors import ConfigError

DIGEST_CHARS = 12
# the training settings a zero-shot task uses (its splits and bootstrap): epochs or lr do not redo it
ZERO_SHOT_TRAIN_KEYS = ("folds", "seeds", "val_fraction", "bootstrap", "seed")


def _common(cfg: PipelineConfig) -> dict[str, Any]:
    # no `results`: a snapshot's results folder is the one it sits in (config.load_config), so moving the folder
    # keeps every snapshot, and every output made with it, valid
    return {"samples": cfg.samples, "encoder": cfg.encoder.model_dump(mode="json")}


def tile_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """What a tile job reads: the reader, tile grid and tissue mask (the slide path and MPP come per slide)."""
    return {"backend": cfg.backend, "tiling": cfg.tiling.model_dump(mode="json"), "tissue": cfg.tissue.model_dump()}


def encode_settings(cfg: PipelineConfig) -> dict[str, Any]:
    return _common(cfg) | {"encode": cfg.encode.model_dump(mode="json")}


def concept_settings(cfg: PipelineConfig, entry: str) -> dict[str, Any]:
    """One concept set's scoring: the features (encoder, device) and the set's entry in explain.concept_sets."""
    assert cfg.explain is not None
    explain = {
        "concept_sets": [entry],
        "chunk_rows": cfg.explain.chunk_rows,
        "text_batch_size": cfg.explain.text_batch_size,
    }
    return encode_settings(cfg) | {"explain": explain}


def task_settings(cfg: PipelineConfig, task_name: str) -> dict[str, Any]:
    """A task's sheet, splits, folds and summary: the task, the training settings it uses, its features."""
    task = cfg.mil.task(task_name)
    train = cfg.mil.train.model_dump(mode="json")
    if task.type == "zero-shot":
        train = {k: train[k] for k in ZERO_SHOT_TRAIN_KEYS}
    mil = {"tasks": [task.model_dump(mode="json")], "train": train, "heatmap_top_k": cfg.mil.heatmap_top_k}
    data = _common(cfg) | {"mil": mil}
    if task.type == "zero-shot":
        data["encode"] = {"device": cfg.encode.device}  # where the text tower runs
    if task.concept_features:
        data["explain"] = {"concept_sets": [task.concept_features]}
    return data


def explain_settings(cfg: PipelineConfig, task_name: str) -> dict[str, Any]:
    """A task's explanation: the task, the explain section, where the text tower and captioner run."""
    assert cfg.explain is not None
    mil = {"tasks": [cfg.mil.task(task_name).model_dump(mode="json")], "heatmap_top_k": cfg.mil.heatmap_top_k}
    explain = cfg.explain.model_dump(mode="json")
    return _common(cfg) | {"encode": {"device": cfg.encode.device}, "mil": mil, "explain": explain}


def settings_text(scope: str, data: dict[str, Any], identity: dict[str, Any] | None = None) -> str:
    """The snapshot's text: a header naming the scope (and what else made it, e.g. a concept set's prompt hash, as a
    comment: not a setting) and the settings as sorted YAML. The digest is taken over all of it."""
    header = f"{SNAPSHOT_HEADER}, scope {scope}: written once, read by that scope's jobs\n"
    if identity:
        header += f"# identity: {json.dumps(identity, sort_keys=True)}\n"
    return header + yaml.safe_dump(data, sort_keys=True)


def settings_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def settings_name(scope: str, text: str) -> str:
    """The snapshot's file name without `.yaml`: `{scope}-{digest}`."""
    return f"{scope}-{settings_digest(text)}"


def write_settings(path: str | Path, text: str) -> Path:
    """Write a snapshot once; an existing one with the same text is left as it is (its date included). A file whose
    text does not match its name (edited by hand, damaged) is refused in one line."""
    path = Path(path)
    if not path.name.endswith(f"-{settings_digest(text)}.yaml"):
        raise ConfigError(f"{path}: the settings text does not match the file's digest; this is a workflow bug")
    try:
        existing = path.read_text() if path.is_file() else None
    except OSError:
        existing = None
    if existing == text:
        return path
    if existing is not None:
        raise ConfigError(
            f"{path}: a run settings snapshot was changed after it was written; delete it and run again "
            "(snapshots are written once and never edited)"
        )
    write_config_text(path, text)
    return path


def prune_superseded(folder: Path, current: Iterable[str]) -> list[Path]:
    """Remove snapshots of the scopes in `current` (file names without .yaml) other than the current ones: their
    outputs were remade or will be, and a later return to those settings must write the snapshot anew."""
    keep = set(current)
    scopes = {name.rsplit("-", 1)[0] for name in keep}
    removed = []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        name = path.name[: -len(".yaml")]
        scope, _, digest = name.rpartition("-")
        if scope in scopes and name not in keep and len(digest) == DIGEST_CHARS:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
