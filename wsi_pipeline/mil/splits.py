"""Patient-level cross-validation splits, repeated over seeds, with a validation split inside each training fold.

Splits are written to JSON once and reused: a later run (or another fold's job) must see the same partition, so a
file made for a different cohort or different settings is an error rather than silently replaced.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import TrainingDataError
from .bags import Bag, bag_strata
from .config import TaskConfig, TrainConfig


def _fingerprint(ids: list[str], groups: list[str], strata: list[int]) -> str:
    payload = json.dumps(sorted(zip(ids, groups, strata, strict=True)))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_splits(
    ids: list[str],
    groups: list[str],
    strata: list[int],
    folds: int,
    seeds: list[int],
    val_fraction: float = 0.15,
    survival: bool = False,
) -> dict[str, Any]:
    """K-fold over groups (patients), stratified by `strata` (class, or event for survival), per seed.

    Every entry holds bag ids for train / val / test; a group never straddles two of them.
    """
    ids_a, groups_a, strata_a = np.asarray(ids), np.asarray(groups), np.asarray(strata)
    per_group = {g: s for g, s in zip(groups, strata, strict=True)}
    values, counts = np.unique(list(per_group.values()), return_counts=True)
    if not survival:
        small = {int(v): int(c) for v, c in zip(values, counts, strict=True) if c < folds}
        if small:
            raise TrainingDataError(
                f"class(es) {small} (class index: patients) have fewer patients than the "
                f"{folds} folds; lower `folds` or add patients"
            )
    if len(per_group) < folds:
        raise TrainingDataError(f"{len(per_group)} patients cannot be split into {folds} folds; lower `folds`")
    n_val = max(2, round(1 / val_fraction))
    entries: list[dict[str, Any]] = []
    with warnings.catch_warnings():  # sklearn warns when a class is smaller than n_splits; handled above
        warnings.simplefilter("ignore", UserWarning)
        for seed in seeds:
            outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            for k, (train, test) in enumerate(outer.split(ids_a, strata_a, groups_a)):
                fit, val = _validation_split(groups_a[train], strata_a[train], n_val, seed + 1000 * (k + 1))
                entries.append(
                    {
                        "index": len(entries),
                        "seed": int(seed),
                        "fold": k,
                        "train": ids_a[train[fit]].tolist(),
                        "val": ids_a[train[val]].tolist(),
                        "test": ids_a[test].tolist(),
                    }
                )
    return {
        "folds": folds,
        "seeds": list(map(int, seeds)),
        "val_fraction": val_fraction,
        "fingerprint": _fingerprint(list(ids), list(groups), list(map(int, strata))),
        "splits": entries,
    }


def _validation_split(groups: np.ndarray, strata: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about 1/n_val of the training groups, stratified when every stratum has two groups or more."""
    per_group = dict(zip(groups.tolist(), strata.tolist(), strict=True))
    smallest = min(np.unique(list(per_group.values()), return_counts=True)[1])
    if smallest >= 2:
        inner = StratifiedGroupKFold(n_splits=min(n_val, smallest), shuffle=True, random_state=seed)
        return next(inner.split(groups, strata, groups))
    names = np.array(sorted(per_group))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(names, max(1, len(names) // n_val), replace=False).tolist())
    is_val = np.array([g in held for g in groups])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load_or_make_splits(
    path: str | Path,
    ids: list[str],
    groups: list[str],
    strata: list[int],
    folds: int,
    seeds: list[int],
    val_fraction: float = 0.15,
    survival: bool = False,
) -> dict[str, Any]:
    """Reuse `path` when it was made for the same bags, labels and settings; otherwise create and write it."""
    path = Path(path)
    fingerprint = _fingerprint(list(ids), list(groups), list(map(int, strata)))
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TrainingDataError(f"{path}: splits file is not valid JSON; delete it to re-create it") from exc
        same = (
            saved.get("fingerprint") == fingerprint
            and saved.get("folds") == folds
            and saved.get("seeds") == list(map(int, seeds))
            and saved.get("val_fraction") == val_fraction
        )
        if not same:
            raise TrainingDataError(
                f"{path}: existing splits were made for other patients, labels or settings; "
                "delete the file (and the folds trained on it) or use another output folder"
            )
        return saved
    splits = make_splits(ids, groups, strata, folds, seeds, val_fraction, survival)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(splits, indent=1))
    tmp.replace(path)  # atomic: parallel fold jobs never read a half-written file
    return splits


def task_splits(path: str | Path, bags: Sequence[Bag], task: TaskConfig, train: TrainConfig) -> dict[str, Any]:
    """The task's splits over `bags` (patient-level, stratified by class or event), made once and reused: what the
    workflow's splits job and in-process training both call."""
    return load_or_make_splits(
        path,
        [b.bag_id for b in bags],
        [b.patient_id for b in bags],
        bag_strata(bags, task.type != "survival"),  # classification and zero-shot: by class
        train.folds,
        train.seeds,
        train.val_fraction,
        task.type == "survival",
    )
