"""All three stages through a real Snakemake run on the demo slides: tiles -> demo-model features -> ABMIL
classification and survival with patient-level CV, summaries, figures, attention heatmaps; then `predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
DEMO = REPO / "workflows" / "demo"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("mil_demo")
    sheet = pd.read_csv(DEMO / "samples.csv")
    # the first 14 demo slides: 9 patients of both classes, enough for 2-fold CV and quick on 2 cores
    sheet = sheet[sheet["slide_id"].str.startswith("demo_")].head(14).copy()
    sheet["path"] = [str(DEMO / p) for p in sheet["path"]]
    sheet.to_csv(wd / "samples.csv", index=False)
    (wd / "cfg.yaml").write_text(
        f"samples: {wd / 'samples.csv'}\nresults: {wd / 'results'}\n"
        "encode:\n  num_workers: 0\n"
        "mil:\n  train:\n    folds: 2\n    epochs: 10\n    bootstrap: 50\n    quiet: true\n  heatmap_top_k: 4\n"
    )
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(wd / "cfg.yaml")]
    run = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return wd / "results"


def test_classification_beats_chance_with_patient_level_folds(demo_run: Path) -> None:
    task = demo_run / "mil" / "demo_class"
    summary = json.loads((task / "summary.json").read_text())
    assert summary["folds_done"] == summary["folds_total"] == 2
    assert summary["metrics"]["auc"]["mean"] > 0.75  # the two demo classes differ visibly
    splits = json.loads((task / "splits.json").read_text())
    sheet = pd.read_csv(task / "sheet.csv")
    patients = dict(zip(sheet["slide_id"], sheet["patient_id"], strict=True))
    for split in splits["splits"]:  # bags are patients: no patient on both sides
        assert not set(split["train"]) & set(split["test"])
    preds = pd.concat(pd.read_csv(task / f"fold{i:02d}" / "predictions.csv") for i in range(2))
    assert set(preds["patient_id"]) == set(patients.values())  # every patient tested once
    for name in ("roc.png", "summary.csv", "folds.csv", "fold00/model.safetensors", "fold00/model.json"):
        assert (task / name).stat().st_size > 0, name


def test_survival_task_reports_c_index_and_km(demo_run: Path) -> None:
    task = demo_run / "mil" / "demo_survival"
    metrics = json.loads((task / "summary.json").read_text())["metrics"]
    assert 0.0 <= metrics["c_index"]["mean"] <= 1.0
    assert (task / "km.png").stat().st_size > 0


def test_attention_and_heatmaps(demo_run: Path) -> None:
    index = json.loads((demo_run / "mil" / "demo_class" / "heatmaps" / "index.json").read_text())
    assert len(index) == 14  # every slide was a test slide once
    sid, entry = next(iter(index.items()))
    assert Path(entry["heatmap"]).stat().st_size > 0 and len(entry["top_tiles"]) <= 4
    att = zarr.open_group(str(demo_run / "attention" / "demo_class" / f"{sid}.zarr"), mode="r")
    tiles = zarr.open_group(str(demo_run / "tiles" / f"{sid}.zarr"), mode="r")
    np.testing.assert_array_equal(att["coords"][:], tiles["coords"][:])
    assert np.isfinite(att["scores"][:]).all()


def test_predict_applies_a_trained_model(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    cmd = [
        str(Path(sys.executable).with_name("wsi-pipeline")),
        "predict",
        "--model",
        str(demo_run / "mil" / "demo_class"),
        "--features",
        str(demo_run / "features" / "conceptclip"),
        "--out",
        str(out),
        "demo_000",
        "demo_001",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    pred = pd.read_csv(out)
    assert len(pred) == 2
