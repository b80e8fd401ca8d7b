"""Patient-level splits: no patient straddles train/val/test, stratified, written once and reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline.errors import TrainingDataError
from wsi_pipeline.mil.splits import load_or_make_splits, make_splits


def cohort(n_patients: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids, groups, strata = [], [], []
    for p in range(n_patients):
        label = p % 3 == 0  # 1/3 positive
        for s in range(rng.integers(1, 4)):  # 1-3 slides per patient
            ids.append(f"P{p:02d}-S{s}")
            groups.append(f"P{p:02d}")
            strata.append(int(label))
    return ids, groups, strata


def test_patients_never_straddle_and_every_bag_tested_once():
    ids, groups, strata = cohort()
    splits = make_splits(ids, groups, strata, folds=5, seeds=[0, 1], val_fraction=0.2)
    assert len(splits["splits"]) == 10
    group_of = dict(zip(ids, groups, strict=True))
    for seed in (0, 1):
        entries = [e for e in splits["splits"] if e["seed"] == seed]
        tested = [i for e in entries for i in e["test"]]
        assert sorted(tested) == sorted(ids)  # each bag exactly once per repeat
        for e in entries:
            parts = [{group_of[i] for i in e[k]} for k in ("train", "val", "test")]
            assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
            assert len(e["train"]) + len(e["val"]) + len(e["test"]) == len(ids)
            assert e["val"], "a validation split for early stopping"
            pos = {group_of[i] for i in e["test"] if strata[ids.index(i)]}
            assert 1 <= len(pos) <= 3  # 10 positive patients over 5 folds: stratified
    a = [e["test"] for e in splits["splits"] if e["seed"] == 0]
    b = [e["test"] for e in splits["splits"] if e["seed"] == 1]
    assert a != b  # repeats differ


def test_split_file_reused_and_checked(tmp_path):
    ids, groups, strata = cohort()
    path = tmp_path / "splits.json"
    first = load_or_make_splits(path, ids, groups, strata, 5, [0], 0.2)
    assert path.exists()
    text = path.read_text()
    again = load_or_make_splits(path, ids, groups, strata, 5, [0], 0.2)
    assert again == json.loads(text) == json.loads(json.dumps(first))
    assert path.read_text() == text  # not rewritten
    with pytest.raises(TrainingDataError, match="other patients, labels or settings"):
        load_or_make_splits(path, ids, groups, strata, 4, [0], 0.2)
    flipped = [1 - s for s in strata]
    with pytest.raises(TrainingDataError, match="delete the file"):
        load_or_make_splits(path, ids, groups, flipped, 5, [0], 0.2)


def test_class_smaller_than_folds_is_an_error():
    ids = [f"s{i}" for i in range(12)]
    strata = [0] * 9 + [1] * 3
    with pytest.raises(TrainingDataError, match=r"fewer patients than the 5 folds"):
        make_splits(ids, ids, strata, folds=5, seeds=[0])
    # survival: stratified by event, few events are allowed (the fold metric is then undefined)
    make_splits(ids, ids, strata, folds=5, seeds=[0], survival=True)
