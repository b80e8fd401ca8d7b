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

from tests.job_kill import run_and_kill_job
from wsi_pipeline.io.atomic import is_temporary

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
DEMO = REPO / "workflows" / "demo"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("mil_demo")
    sheet = pd.read_csv(DEMO / "samples.csv")
    # the 20 synthetic demo slides (13 patients): 3-fold CV as in the demo, so attention has enough to learn from
    sheet = sheet[sheet["slide_id"].str.startswith("demo_")].copy()
    sheet["path"] = [str(DEMO / p) for p in sheet["path"]]
    sheet.to_csv(wd / "samples.csv", index=False)
    (wd / "cfg.yaml").write_text(
        f"samples: {wd / 'samples.csv'}\nresults: {wd / 'results'}\n"
        "encode:\n  num_workers: 0\n"
        "mil:\n  train:\n    folds: 3\n    epochs: 30\n    bootstrap: 50\n    quiet: true\n  heatmap_top_k: 4\n"
    )
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(wd / "cfg.yaml")]
    run = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return wd / "results"


def test_classification_beats_chance_with_patient_level_folds(demo_run: Path) -> None:
    task = demo_run / "mil" / "demo_class"
    summary = json.loads((task / "summary.json").read_text())
    assert summary["folds_done"] == summary["folds_total"] == 3
    assert summary["metrics"]["auc"]["mean"] > 0.75  # the two demo classes differ visibly
    splits = json.loads((task / "splits.json").read_text())
    sheet = pd.read_csv(task / "sheet.csv")
    patients = dict(zip(sheet["slide_id"], sheet["patient_id"], strict=True))
    for split in splits["splits"]:  # bags are patients: no patient on both sides
        assert not set(split["train"]) & set(split["test"])
    preds = pd.concat(pd.read_csv(task / f"fold{i:02d}" / "predictions.csv") for i in range(3))
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
    assert len(index) == 20  # every slide was a test slide once
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


def predict_cli(model: Path, features: Path, out: Path, *slides: str) -> subprocess.CompletedProcess[str]:
    cli = str(Path(sys.executable).with_name("wsi-pipeline"))
    args = [cli, "predict", "--model", str(model), "--features", str(features), "--out", str(out), *slides]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_predict_refuses_what_it_cannot_apply_in_one_line(demo_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_encoder"
    group = zarr.open_group(str(other / "demo_000.zarr"), mode="w")
    group.create_array("features", data=np.zeros((5, 7), np.float16))
    group.create_array("coords", data=np.zeros((5, 2), np.int64))
    cases = [
        (demo_run / "mil" / "demo_class", other, "features are 7-d but the model in"),
        (demo_run / "mil" / "demo_zero_shot", demo_run / "features" / "conceptclip", "a zero-shot task has no trained"),
        (demo_run / "mil" / "demo_class_concepts", demo_run / "features" / "conceptclip", "learnt from concept scores"),
    ]
    for model, features, says in cases:
        run = predict_cli(model, features, tmp_path / "p.csv", "demo_000")
        assert run.returncode == 1 and says in run.stderr and run.stderr.count("\n") == 1, run.stderr[-3000:]
    # the concept bottleneck applied to its concept scores works
    scores = demo_run / "explain" / "conceptclip" / "tissue"
    run = predict_cli(demo_run / "mil" / "demo_class_concepts", scores, tmp_path / "p.csv", "demo_000", "demo_001")
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "p.csv")) == 2


# --- stage 4 (explain:) in the same run: the shipped config scores tissue + lesion, runs demo_zero_shot and the
# concept-bottleneck demo_class_concepts. The demo model and the slides' known textures give checkable answers.


def tile_textures(slide_id: str, coords: np.ndarray, tile_px: int = 256) -> list[str]:
    """Each tile's texture from the demo's ground truth (workflows/demo/slides/textures.csv): the region that holds
    the tile's centre ('' off every region); regions are ellipses or rectangles in level-0 pixels."""
    regions = pd.read_csv(DEMO / "slides" / "textures.csv").query("slide_id == @slide_id")
    out = []
    for x, y in coords + tile_px / 2:
        name = ""
        for r in regions.itertuples():
            cx, cy, rx, ry = (r.x0 + r.x1) / 2, (r.y0 + r.y1) / 2, (r.x1 - r.x0) / 2, (r.y1 - r.y0) / 2
            inside = (
                ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
                if r.kind == "ellipse"
                else abs(x - cx) < rx and abs(y - cy) < ry
            )
            name = r.texture if inside else name
        out.append(name)
    return out


def test_tile_concept_scores_find_the_known_textures(demo_run: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from wsi_pipeline.explain.store import read_concept_scores
    from wsi_pipeline.synthetic import TEXTURE_CONCEPTS

    truth, rows = [], []
    for store in sorted((demo_run / "explain" / "conceptclip" / "tissue").glob("demo_*.zarr")):
        scores = read_concept_scores(store)
        assert scores.attrs["feature_check"]["status"] == "verified"  # stored features = the model's logit vector
        assert scores.attrs["prompt_hash"] and scores.attrs["text_encoder"]["path"].endswith("demo_clip")
        truth += tile_textures(store.name.removesuffix(".zarr"), scores.coords)
        rows.append(scores.cosine)
        concepts = scores.concepts
    cosine, truth = np.concatenate(rows), np.array(truth)
    for texture in set(truth) - {""}:
        column = cosine[:, concepts.index(TEXTURE_CONCEPTS[texture])]
        assert roc_auc_score(truth == texture, column) >= 0.9, texture


def test_zero_shot_task_is_scored_like_a_trained_task(demo_run: Path) -> None:
    zero = json.loads((demo_run / "mil" / "demo_zero_shot" / "summary.json").read_text())
    trained = json.loads((demo_run / "mil" / "demo_class" / "summary.json").read_text())
    assert set(trained) <= set(zero) and set(zero) - set(trained) == {"zero_shot"}
    assert zero["metrics"]["auc"]["mean"] >= 0.9  # no training: tumour prompts find the tumour slides
    assert zero["zero_shot"]["primary_k"] == 5 and "top5" in zero["zero_shot"]["poolings"]
    assert (demo_run / "mil" / "demo_zero_shot" / "roc.png").stat().st_size > 0


def test_attention_enriches_the_concept_that_defines_the_class(demo_run: Path) -> None:
    explain = demo_run / "mil" / "demo_class" / "explain"
    table = pd.read_csv(explain / "concepts.csv")
    tissue = table[(table["concept_set"] == "tissue") & (table["contrast"] == "1 vs 0")]
    assert tissue.loc[tissue["mean_diff"].idxmax(), "concept"] == "tumour epithelium"  # class 1 = tumour
    record = json.loads((explain / "slides" / "demo_001.json").read_text())
    assert record["slide_id"] == "demo_001" and record["top_tiles"]
    assert (explain / "index.html").stat().st_size > 0


def test_concept_bottleneck_task_learns_from_concept_scores(demo_run: Path) -> None:
    task = demo_run / "mil" / "demo_class_concepts"
    config = json.loads((task / "config.json").read_text())
    assert config["features_dir"].endswith("explain/conceptclip/tissue")
    assert json.loads((task / "summary.json").read_text())["metrics"]["auc"]["mean"] > 0.75


def test_every_task_lands_in_one_table(demo_run: Path) -> None:
    table = pd.read_csv(demo_run / "mil" / "tasks.csv").set_index("task")
    assert list(table.index) == ["demo_class", "demo_survival", "demo_zero_shot", "demo_class_concepts"]
    assert (
        table.loc["demo_zero_shot", "model"] == "mi-zero (top5)" and table.loc["demo_survival", "metric"] == "c_index"
    )
    assert table.loc["demo_class_concepts", "features"] == "concepts:tissue"
    summary = json.loads((demo_run / "mil" / "demo_class" / "summary.json").read_text())
    assert table.loc["demo_class", "mean"] == pytest.approx(summary["metrics"]["auc"]["mean"])


def test_a_slide_re_encoded_by_hand_has_its_concept_scores_redone(demo_run: Path) -> None:
    """Last in this file: it changes the demo results. A feature store rewritten outside the workflow (a repair)
    leaves Snakemake's dates as they were; the concept stores' own record of the store they read sees it."""
    wd = demo_run.parent
    snakemake = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(wd / "cfg.yaml")]
    scores = demo_run / "explain" / "conceptclip" / "tissue" / "demo_003.zarr"
    was = zarr.open_group(str(scores), mode="r").attrs["feature_store_id"]
    encode_settings = next((demo_run / "settings").glob("encode-*.yaml"))
    cli = str(Path(sys.executable).with_name("wsi-pipeline"))
    args = ["encode", "demo_003", "--out", str(demo_run), "--config", str(encode_settings), "--force"]
    encoded = subprocess.run([cli, *args, "--num-workers", "0"], capture_output=True, text=True, timeout=300)
    assert encoded.returncode == 0, encoded.stderr[-2000:]
    now = zarr.open_group(str(demo_run / "features" / "conceptclip" / "demo_003.zarr"), mode="r").attrs["store_id"]
    assert now != was
    dry = subprocess.run([*snakemake, "-n"], cwd=wd, capture_output=True, text=True, timeout=300)
    assert "concept_scores" in dry.stdout and "rule encode" not in dry.stdout and "rule tile" not in dry.stdout
    # every task is made again from the sheet: the raw-feature ones because their sheet recorded the old store, the
    # concept bottleneck because its scores are redone
    assert dry.stdout.count("rule mil_sheet:") == 4 and dry.stdout.count("rule redo_marker:") == 5, dry.stdout[-3000:]
    run = subprocess.run(snakemake, cwd=wd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert zarr.open_group(str(scores), mode="r").attrs["feature_store_id"] == now
    table = pd.read_csv(demo_run / "explain" / "conceptclip" / "tissue" / "cohort.csv").set_index("slide_id")
    assert not table.loc["demo_003", "reused"] and table["reused"].sum() == len(table) - 1
    record = json.loads((demo_run / "mil" / "demo_class" / "features.json").read_text())
    assert record["stores"]["demo_003"] == now
    again = subprocess.run([*snakemake, "-n"], cwd=wd, capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in again.stdout, again.stdout[-3000:]


def test_kill_9_of_an_explain_job_then_the_same_command_gives_the_same_explanation(demo_run: Path) -> None:
    wd = demo_run.parent
    snakemake = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(wd / "cfg.yaml")]
    explain = demo_run / "mil" / "demo_class" / "explain"
    reference = pd.read_csv(explain / "concepts.csv")
    records = {p.name: json.loads(p.read_text()) for p in (explain / "slides").glob("*.json")}
    (explain / "index.html").unlink()  # the explain job runs again
    pattern = "wsi_pipeline explain --config .* --task demo_class$"
    killed, status, out = run_and_kill_job(snakemake, wd, pattern, after_s=2.0)  # into its figures
    assert killed and status != 0, out[-3000:]
    again = subprocess.run(snakemake, cwd=wd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(explain / "concepts.csv"), reference)
    assert {p.name: json.loads(p.read_text()) for p in (explain / "slides").glob("*.json")} == records
    assert not [p for p in explain.rglob("*") if is_temporary(p)]  # the killed writer's temporaries are gone
