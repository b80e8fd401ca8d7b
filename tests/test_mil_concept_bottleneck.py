"""Concept-bottleneck tasks (`features: concepts:<set>`): stage 3 trains on stage 4's tile concept scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr

from wsi_pipeline.config import load_config
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.explain.store import ConceptScores, write_concept_scores
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.mil.config import TaskConfig
from wsi_pipeline.mil.train import train_task
from wsi_pipeline.mil.workflow import task_features_dir, write_task_sheet

CONCEPTS = ["tumour epithelium", "stroma", "lymphocytes", "necrosis"]
TRAIN = {
    "model": "abmil",
    "hidden_dim": 16,
    "attn_dim": 8,
    "dropout": 0.0,
    "lr": 1e-2,
    "epochs": 15,
    "patience": 15,
    "folds": 3,
    "val_fraction": 0.25,
    "quiet": True,
    "batch_size": 2,
    "bootstrap": 20,
    "device": "cpu",
    "num_threads": 1,
    "standardize": True,
}


def scored_cohort(results, n_slides: int = 24, seed: int = 0) -> pd.DataFrame:
    """Concept-score stores (as stage 4 writes them) where class-1 slides have tiles high on 'tumour epithelium';
    feature sidecars say ok, as stage 2 writes them."""
    rng = np.random.default_rng(seed)
    layout = ResultsLayout(results)
    rows = []
    for i in range(n_slides):
        sid, label = f"s{i:02d}", i % 2
        n = int(rng.integers(20, 40))
        cos = rng.normal(0.1, 0.03, (n, len(CONCEPTS))).astype(np.float32)
        if label:
            cos[rng.choice(n, 6, replace=False), 0] += 0.2
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        write_concept_scores(
            layout.concept_store("enc", "tissue", sid),
            ConceptScores(CONCEPTS, cos, coords, attrs={"concept_set": "tissue"}),
        )
        layout.concept_sidecar("enc", "tissue", sid).write_text(json.dumps({"status": "ok", "n_tiles": n}))
        layout.feature_sidecar("enc", sid).parent.mkdir(parents=True, exist_ok=True)
        layout.feature_sidecar("enc", sid).write_text(json.dumps({"status": "ok", "n_tiles": n}))
        rows.append({"slide_id": sid, "patient_id": f"P{i:02d}", "label": label})
    return pd.DataFrame(rows).set_index("slide_id", drop=False)


def test_concept_task_trains_on_concept_scores(tmp_path) -> None:
    results = tmp_path / "results"
    cohort = scored_cohort(results)
    task = TaskConfig(name="cb", label="label", features="concepts:tissue")
    assert task.concept_features == "tissue"
    features = task_features_dir(results, "enc", task)
    assert features == ResultsLayout(results).concept_dir("enc", "tissue")
    # one slide not scored yet: left out of the sheet with the reason
    ResultsLayout(results).concept_sidecar("enc", "tissue", "s23").unlink()
    sheet = write_task_sheet(cohort, results, "enc", task)
    assert len(sheet) == 23
    excluded = pd.read_csv(ResultsLayout(results).task_dir("cb") / "excluded.csv")
    assert excluded.to_dict("records")[0]["encode_status"] == "not scored"
    out = ResultsLayout(results).task_dir("cb")
    res = train_task(out / "sheet.csv", features, task, TRAIN, out, attention_dir=results / "attention" / "cb")
    assert res["summary"]["metrics"]["auc"]["mean"] > 0.8
    att = zarr.open_group(str(results / "attention" / "cb" / "s01.zarr"), mode="r")
    assert att["coords"].shape[0] == att["scores"].shape[0] > 0  # coords come from the concept store


def test_concept_task_needs_its_set_scored() -> None:
    task = {"name": "cb", "label": "label", "features": "concepts:tissue"}
    with pytest.raises(ConfigError, match="not in explain.concept_sets"):
        load_config({"samples": "x.csv", "mil": {"tasks": [task]}})
    cfg = load_config({"samples": "x.csv", "mil": {"tasks": [task]}, "explain": {"concept_sets": ["tissue"]}})
    assert cfg.mil.tasks[0].concept_features == "tissue"
    with pytest.raises(ConfigError, match="raw' or 'concepts:<concept set>"):
        load_config({"samples": "x.csv", "mil": {"tasks": [task | {"features": "tissue"}]}})


def test_stage_4_needs_an_encoder_with_a_text_tower() -> None:
    base = {"samples": "x.csv", "encoder": {"name": "stain-texture"}}
    with pytest.raises(ConfigError, match="explain: section needs a text tower: encoder 'stain-texture' has no"):
        load_config(base | {"explain": {"concept_sets": ["tissue"]}})
    zero_shot = {"name": "zs", "type": "zero-shot", "label": "label", "class_prompts": {"a": ["x"], "b": ["y"]}}
    with pytest.raises(ConfigError, match="zero-shot task 'zs' needs a text tower"):
        load_config(base | {"mil": {"tasks": [zero_shot]}})
    assert load_config(base).explain is None  # image-only encoders run stages 1-3 as before
