"""MI-Zero zero-shot slide classification: the pooling against numpy by hand, then end to end on real Zarr feature
stores (the package's stage-2 writer) scored by a tiny real open_clip text tower, with features planted so the
right answer is known; the task folder laid out like a trained task's; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from tiny_models import TINY_OPEN_CLIP_PREPROCESS, no_network  # noqa: F401

from wsi_pipeline import __version__
from wsi_pipeline.encode.sidecar import EncodeSidecar
from wsi_pipeline.encode.store import ShardWriter, create_feature_arrays, plan_layout
from wsi_pipeline.encoders import EncoderConfig, build_encoder
from wsi_pipeline.encoders.text import build_text_encoder
from wsi_pipeline.errors import ConfigError, FeatureError, PipelineError, TrainingDataError
from wsi_pipeline.explain import zero_shot
from wsi_pipeline.explain.text_cache import ConceptEmbeddings
from wsi_pipeline.explain.zero_shot import (
    class_probabilities,
    pool_tile_scores,
    pooling_names,
    run_zero_shot_task,
    zero_shot_embeddings,
)
from wsi_pipeline.io.atomic import atomic_group
from wsi_pipeline.layout import STATUS_FAILED, STATUS_OK, ResultsLayout
from wsi_pipeline.mil.config import TaskConfig
from wsi_pipeline.mil.train import train_task
from wsi_pipeline.mil.workflow import write_task_sheet

pytestmark = pytest.mark.usefixtures("no_network")

ENCODER = "open_clip"
CLASSES = ["benign", "tumour"]
PLANTED = 6  # tiles per slide carrying its class's text direction
TASK = {
    "name": "zs",
    "type": "zero-shot",
    "label": "diagnosis",
    "class_prompts": {"benign": ["normal tissue", "benign glands"], "tumour": ["tumour cells", "carcinoma"]},
    "top_k": [1, 5, 50],  # 50: more than any bag has
    "primary_k": 5,
}
TRAIN = {"folds": 3, "seeds": [0], "val_fraction": 0.25, "bootstrap": 50, "loader_threads": 1}
# The real CLIP BPE vocabulary size, so open_clip's tokenizer fits the tiny text tower.
TINY_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# --- the pooling, by hand ---


def test_top_k_and_mean_pooling_match_numpy() -> None:
    scores = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4], [0.7, -0.1]])  # 4 tiles x 2 classes
    pooled = pool_tile_scores(scores, [2, 1, 10])
    assert list(pooled) == pooling_names([2, 1, 10]) == ["top1", "top2", "top10", "mean"]
    np.testing.assert_allclose(pooled["top1"], [0.7, 0.9])  # each class's own best tile
    np.testing.assert_allclose(pooled["top2"], [(0.7 + 0.5) / 2, (0.9 + 0.4) / 2])
    np.testing.assert_allclose(pooled["top10"], scores.mean(0))  # K > bag: clipped to the 4 tiles
    np.testing.assert_allclose(pooled["mean"], scores.mean(0))
    rng = np.random.default_rng(0)
    big = rng.normal(size=(37, 5))
    for k, values in pool_tile_scores(big, [3, 7]).items():
        if k == "mean":
            continue
        kk = int(k[3:])
        expected = [np.sort(big[:, c])[::-1][:kk].mean() for c in range(5)]
        np.testing.assert_allclose(values, expected)
    with pytest.raises(ValueError, match="non-empty"):
        pool_tile_scores(np.zeros((0, 2)), [1])


def test_softmax_over_pooled_class_scores() -> None:
    pooled = np.array([0.30, 0.25, -0.1])
    probs = class_probabilities(pooled, logit_scale=20.0)
    expected = np.exp(20 * pooled) / np.exp(20 * pooled).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert probs.shape == (3,) and probs.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(class_probabilities(pooled, 20.0, logit_bias=-3.0), probs, rtol=1e-6)  # same shift
    batch = class_probabilities(np.stack([pooled, pooled[::-1]]), 20.0)
    np.testing.assert_allclose(batch[1], expected[::-1], rtol=1e-6)
    # pooling the logits equals pooling cosines then scaling: softmax(20 * top2 mean) from tile logits
    tiles = np.array([[0.2, 0.1], [0.4, 0.0], [0.1, 0.3]])
    from_logits = pool_tile_scores(20 * tiles, [2])["top2"]
    np.testing.assert_allclose(
        class_probabilities(pool_tile_scores(tiles, [2])["top2"], 20.0),
        np.exp(from_logits) / np.exp(from_logits).sum(),
        rtol=1e-6,
    )


# --- a cohort of real feature stores with a known answer ---


def make_tiny_clip(root: Path) -> Path:
    """An open_clip hf-hub style directory (open_clip_config.json + safetensors): image and text towers."""
    import open_clip
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    cfg = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_OPEN_CLIP_PREPROCESS}
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    return root


def write_feature_store(results: Path, slide_id: str, feats: np.ndarray, provenance: dict[str, Any]) -> None:
    """A store as stage 2 writes it (the package's sharded writer, atomic publish) and its ok sidecar."""
    layout = ResultsLayout(results)
    n, dim = feats.shape
    coords = np.stack([np.arange(n) * 224, np.full(n, 448)], 1).astype(np.int64)
    with atomic_group(layout.feature_store(ENCODER, slide_id)) as g:
        f_arr, c_arr = create_feature_arrays(g, n, dim, "float16", plan_layout(n, dim))
        for arr, rows in ((f_arr, feats), (c_arr, coords)):
            writer = ShardWriter(arr)
            writer.append(rows)
            writer.close()
        g.attrs.update({"encoder": ENCODER, "provenance": provenance, "n_tiles": n, "complete": True})
    side = EncodeSidecar(
        slide_id=slide_id,
        encoder=ENCODER,
        status=STATUS_OK,
        n_tiles=n,
        batch_size=8,
        num_workers=0,
        dtype="float16",
        package_version=__version__,
    )
    side.write(layout.feature_sidecar(ENCODER, slide_id))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """12 patients (two with two slides) + one slide whose encoding failed; planted tiles = class text + noise,
    the rest sit between both classes (same cosine with each): the top-K tiles decide."""
    tmp = tmp_path_factory.mktemp("zero_shot")
    model_dir = make_tiny_clip(tmp / "model")
    cfg = EncoderConfig(name=ENCODER, path=str(model_dir))
    text = build_text_encoder(cfg)
    image_provenance = build_encoder(cfg).provenance()  # what stage 2 records
    results = tmp / "results"
    task = TaskConfig.model_validate(TASK)
    emb = zero_shot_embeddings(task, text, ResultsLayout(results).text_cache_dir(ENCODER))
    rng = np.random.default_rng(1)
    between = emb.embeddings.sum(0) / np.linalg.norm(emb.embeddings.sum(0))
    rows, planted = [], {}
    for p in range(12):
        label = p % 2
        for s in range(1 + (p in (0, 5))):
            sid = f"P{p:02d}-S{s}"
            n = int(rng.integers(15, 40))
            x = between + 0.02 * rng.normal(size=(n, emb.dim))
            rows_planted = rng.choice(n, PLANTED, replace=False)
            x[rows_planted] = emb.embeddings[label] + 0.02 * rng.normal(size=(PLANTED, emb.dim))
            x *= rng.uniform(2, 8, size=(n, 1))  # stored features are not unit length
            write_feature_store(results, sid, x.astype(np.float32), image_provenance)
            planted[sid] = set(rows_planted.tolist())
            rows.append(
                {"slide_id": sid, "path": f"/slides/{sid}.svs", "patient_id": f"P{p:02d}", "diagnosis": CLASSES[label]}
            )
    rows.append({"slide_id": "P12-S0", "path": "/slides/P12-S0.svs", "patient_id": "P12", "diagnosis": "tumour"})
    EncodeSidecar(
        slide_id="P12-S0",
        encoder=ENCODER,
        status=STATUS_FAILED,
        reason="unreadable slide",
        batch_size=8,
        num_workers=0,
        dtype="float16",
        package_version=__version__,
    ).write(ResultsLayout(results).feature_sidecar(ENCODER, "P12-S0"))
    table = pd.DataFrame(rows).set_index("slide_id", drop=False)
    sheet = write_task_sheet(table, results, ENCODER, task)
    assert "P12-S0" not in set(sheet["slide_id"])  # failed encode: excluded, not an error
    summary = run_zero_shot_task(results, task, TRAIN, ENCODER, emb)
    return {"results": results, "task": task, "emb": emb, "planted": planted, "summary": summary, "text": text}


def test_known_answer_gives_auc_one_for_every_pooling(cohort: dict[str, Any]) -> None:
    summary = cohort["summary"]
    assert summary["type"] == "zero-shot" and summary["model"] == "mi-zero"
    assert summary["folds_done"] == summary["folds_total"] == 3
    assert summary["metrics"]["auc"]["mean"] == summary["metrics"]["auc"]["pooled"] == 1.0
    section = summary["zero_shot"]
    order = section["pooling_order"].index
    assert section["pooling_order"] == ["top1", "top5", "top50", "mean"] == sorted(section["poolings"], key=order)
    for name, entry in section["poolings"].items():
        for metric in ("auc", "accuracy", "balanced_accuracy"):
            assert entry[metric]["mean"] == entry[metric]["pooled"] == 1.0, (name, metric)
    assert section["poolings"]["top50"]["k"] == 50 and section["poolings"]["mean"]["k"] is None
    emb = cohort["emb"]
    assert section["primary_k"] == 5 and section["primary_pooling"] == "top5"
    assert section["class_prompts"] == TASK["class_prompts"] and section["templates"] == cohort["task"].templates
    assert section["prompt_hash"] == emb.prompt_hash and section["logit_scale"] == pytest.approx(emb.logit_scale)
    assert section["text_encoder"]["encoder"] == ENCODER and section["text_encoder"]["weights_sha256"]
    out = ResultsLayout(cohort["results"]).task_dir("zs")
    for name in ("summary.csv", "folds.csv", "roc.png", "zero_shot/summary.csv", "zero_shot/poolings.csv"):
        assert (out / name).stat().st_size > 0, name


def test_probabilities_match_a_hand_computation_from_the_store(cohort: dict[str, Any]) -> None:
    """Patient P05's two slides form one bag: top-5 over both, cosine, softmax at the model's logit scale."""
    results, emb = cohort["results"], cohort["emb"]
    feats = np.concatenate(
        [
            zarr.open_group(str(ResultsLayout(results).feature_store(ENCODER, f"P05-S{s}")))["features"][:]
            for s in (0, 1)
        ]
    ).astype(np.float64)
    cos = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ emb.embeddings.T.astype(np.float64)
    top5 = np.sort(cos, axis=0)[::-1][:5].mean(0)
    expected = np.exp(emb.logit_scale * top5) / np.exp(emb.logit_scale * top5).sum()
    out = ResultsLayout(results).task_dir("zs")
    preds = pd.concat(pd.read_csv(out / f"fold{i:02d}" / "predictions.csv") for i in range(3))
    row = preds[preds["bag_id"] == "P05"].iloc[0]
    assert row["slide_ids"] == "P05-S0;P05-S1" and row["pooling"] == "top5" and row["pred"] == "tumour"
    np.testing.assert_allclose([row["prob_benign"], row["prob_tumour"]], expected, atol=1e-5)
    table = pd.read_csv(out / "zero_shot" / "poolings.csv")
    mean_row = table[(table["bag_id"] == "P05") & (table["pooling"] == "mean")].iloc[0]
    mean_cos = cos.mean(0)
    np.testing.assert_allclose(
        [mean_row["prob_benign"], mean_row["prob_tumour"]],
        np.exp(emb.logit_scale * mean_cos) / np.exp(emb.logit_scale * mean_cos).sum(),
        atol=1e-5,
    )


def test_top_tiles_are_the_planted_ones(cohort: dict[str, Any]) -> None:
    results, planted = cohort["results"], cohort["planted"]
    layout = ResultsLayout(results)
    tiles = json.loads((layout.task_dir("zs") / "zero_shot" / "tiles.json").read_text())
    assert tiles["pooling"] == "top5" and tiles["k"] == 5
    assert tiles["slides"]["P00-S1"] == "P00" and len(tiles["slides"]) == 14
    for bag_id, entry in tiles["bags"].items():
        assert entry["predicted"] == entry["label"] and len(entry["tiles"]) == 5, bag_id
        logits = [t["logit"] for t in entry["tiles"]]
        assert logits == sorted(logits, reverse=True)
        for t in entry["tiles"]:
            assert t["row"] in planted[t["slide_id"]]
            coords = zarr.open_group(str(layout.feature_store(ENCODER, t["slide_id"])))["coords"][t["row"]]
            assert [t["x"], t["y"]] == coords.tolist()
    # per-tile predicted-class logits where trained tasks put attention: the heatmaps read them unchanged
    att = zarr.open_group(str(layout.attention_dir("zs") / "P03-S0.zarr"), mode="r")
    n = zarr.open_group(str(layout.feature_store(ENCODER, "P03-S0")))["features"].shape[0]
    assert att["scores"].shape == (n,) and att["coords"].shape == (n, 2)
    assert int(np.argmax(att["scores"][:])) in planted["P03-S0"]
    assert att.attrs["model"] == "mi-zero" and att.attrs["predicted"] == "tumour"


def test_task_folder_matches_a_trained_task(cohort: dict[str, Any], tmp_path: Path) -> None:
    """Same splits, same summary keys (plus `zero_shot`), a trained fold's prediction columns and metric keys."""
    results = cohort["results"]
    zs = ResultsLayout(results).task_dir("zs")
    trained_out = tmp_path / "dx"
    train = TRAIN | {"epochs": 1, "min_epochs": 1, "hidden_dim": 8, "attn_dim": 8, "quiet": True, "device": "cpu"}
    task = {"name": "dx", "label": "diagnosis", "classes": CLASSES}
    trained = train_task(zs / "sheet.csv", ResultsLayout(results).feature_dir(ENCODER), task, train, trained_out)
    summary = cohort["summary"]
    assert set(summary) - set(trained["summary"]) == {"zero_shot"} and set(trained["summary"]) <= set(summary)
    assert set(summary["metrics"]) == set(trained["summary"]["metrics"])
    for key in summary["metrics"]:
        assert set(trained["summary"]["metrics"][key]) <= set(summary["metrics"][key])
    assert json.loads((zs / "splits.json").read_text()) == json.loads((trained_out / "splits.json").read_text())
    for i in range(3):
        ours = pd.read_csv(zs / f"fold{i:02d}" / "predictions.csv")
        theirs = pd.read_csv(trained_out / f"fold{i:02d}" / "predictions.csv")
        assert list(theirs.columns) == [c for c in ours.columns if c != "pooling"]
        assert ours["bag_id"].tolist() == theirs["bag_id"].tolist()
        m_ours = json.loads((zs / f"fold{i:02d}" / "metrics.json").read_text())
        m_theirs = json.loads((trained_out / f"fold{i:02d}" / "metrics.json").read_text())
        assert set(m_theirs) <= set(m_ours) and m_ours["n_train"] == 0 and m_ours["poolings"]["mean"]["auc"] == 1.0
    assert pd.read_csv(zs / "folds.csv").columns.tolist() == pd.read_csv(trained_out / "folds.csv").columns.tolist()


def test_one_bag_per_slide_splits_by_patient(
    cohort: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zero_shot, "READ_ROWS", 7)  # features read in many small blocks: the same numbers
    task = cohort["task"].model_copy(update={"pool_slides": False})
    sheet = ResultsLayout(cohort["results"]).task_dir("zs") / "sheet.csv"
    summary = run_zero_shot_task(
        cohort["results"],
        task,
        TRAIN,
        ENCODER,
        cohort["emb"],
        out_dir=tmp_path / "zs",
        sheet_csv=sheet,
        attention_dir=tmp_path / "att",
    )
    assert summary["zero_shot"]["poolings"]["top5"]["auc"]["pooled"] == 1.0
    preds = pd.concat(pd.read_csv(tmp_path / "zs" / f"fold{i:02d}" / "predictions.csv") for i in range(3))
    assert sorted(preds["bag_id"]) == sorted(pd.read_csv(sheet)["slide_id"])  # every slide its own bag, once
    pooled_run = pd.read_csv(ResultsLayout(cohort["results"]).task_dir("zs") / "zero_shot" / "poolings.csv")
    per_slide = pd.read_csv(tmp_path / "zs" / "zero_shot" / "poolings.csv")
    single = pooled_run[~pooled_run["slide_ids"].str.contains(";")].set_index(["slide_ids", "pooling"])
    again = per_slide.set_index(["slide_ids", "pooling"]).loc[single.index]
    np.testing.assert_allclose(again["prob_tumour"], single["prob_tumour"], atol=1e-6)
    p00 = preds[preds["patient_id"] == "P00"]
    assert len(p00) == 2 and p00["fold"].nunique() == 1  # a patient's slides are tested in one fold


# --- one-line errors ---


def one_line(exc_type: type[PipelineError], fn: Any, *fragments: str) -> str:
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_label_without_class_prompts(cohort: dict[str, Any], tmp_path: Path) -> None:
    sheet = pd.read_csv(ResultsLayout(cohort["results"]).task_dir("zs") / "sheet.csv")
    sheet.loc[sheet["patient_id"] == "P03", "diagnosis"] = "necrosis"
    sheet.to_csv(tmp_path / "sheet.csv", index=False)
    run = lambda: run_zero_shot_task(  # noqa: E731
        cohort["results"],
        cohort["task"],
        TRAIN,
        ENCODER,
        cohort["emb"],
        out_dir=tmp_path / "o",
        sheet_csv=tmp_path / "sheet.csv",
    )
    one_line(TrainingDataError, run, str(tmp_path / "sheet.csv"), "'zs'", "['necrosis']", "class_prompts")
    assert not (tmp_path / "o" / "config.json").exists()


def test_feature_store_of_another_encoder(cohort: dict[str, Any], tmp_path: Path) -> None:
    results = tmp_path / "results"
    sheet = pd.read_csv(ResultsLayout(cohort["results"]).task_dir("zs") / "sheet.csv")
    for sid in sheet["slide_id"]:
        prov = {"encoder": ENCODER, "weights_sha256": "f" * 64} if sid == "P04-S0" else cohort["emb"].text_provenance
        write_feature_store(results, sid, np.random.default_rng(0).normal(size=(8, 24)), prov)
    sheet.to_csv(tmp_path / "sheet.csv", index=False)
    run = lambda: run_zero_shot_task(  # noqa: E731
        results, cohort["task"], TRAIN, ENCODER, cohort["emb"], sheet_csv=tmp_path / "sheet.csv", out_dir=tmp_path / "o"
    )
    store = ResultsLayout(results).feature_store(ENCODER, "P04-S0")
    one_line(FeatureError, run, str(store), "weights ffffffffffff", "text tower", "encode the slides")
    assert not (tmp_path / "o" / "splits.json").exists()  # checked before anything is written


def test_no_slides_with_features(cohort: dict[str, Any], tmp_path: Path) -> None:
    results = tmp_path / "results"
    table = pd.DataFrame([{"slide_id": "A", "path": "/a.svs", "patient_id": "A", "diagnosis": "tumour"}])
    write_task_sheet(table.set_index("slide_id", drop=False), results, ENCODER, cohort["task"])  # A never encoded
    run = lambda: run_zero_shot_task(results, cohort["task"], TRAIN, ENCODER, cohort["emb"])  # noqa: E731
    one_line(TrainingDataError, run, "sheet.csv", "no slide of zero-shot task 'zs' has features", "excluded.csv")
    one_line(
        ConfigError,
        lambda: run_zero_shot_task(tmp_path / "none", cohort["task"], TRAIN, ENCODER, cohort["emb"]),
        "mil-sheet",
    )


def test_missing_store_wrong_task_and_wrong_embeddings(cohort: dict[str, Any], tmp_path: Path) -> None:
    sheet = pd.read_csv(ResultsLayout(cohort["results"]).task_dir("zs") / "sheet.csv")
    pd.concat([sheet, sheet.iloc[:1].assign(slide_id="ghost", patient_id="G")]).to_csv(tmp_path / "s.csv", index=False)
    run = lambda: run_zero_shot_task(  # noqa: E731
        cohort["results"],
        cohort["task"],
        TRAIN,
        ENCODER,
        cohort["emb"],
        sheet_csv=tmp_path / "s.csv",
        out_dir=tmp_path / "o",
    )
    one_line(TrainingDataError, run, "ghost", "no feature store")
    trained = {"name": "dx", "label": "diagnosis"}
    one_line(
        ConfigError,
        lambda: run_zero_shot_task(cohort["results"], trained, TRAIN, ENCODER, cohort["emb"]),
        "'dx'",
        "not zero-shot",
    )
    other = cohort["task"].model_copy(update={"templates": ["a photo of {}."]})
    one_line(
        ConfigError,
        lambda: run_zero_shot_task(cohort["results"], other, TRAIN, ENCODER, cohort["emb"]),
        "zero_shot_embeddings",
    )
    doubled = TaskConfig.model_validate(
        TASK | {"class_prompts": {"benign": ["normal", "normal"], "tumour": ["carcinoma"]}}
    )
    one_line(ConfigError, lambda: zero_shot_embeddings(doubled, cohort["text"]), "'zs'", "twice")


def test_embeddings_are_cached_and_reused(cohort: dict[str, Any]) -> None:
    cache = ResultsLayout(cohort["results"]).text_cache_dir(ENCODER)
    again = zero_shot_embeddings(cohort["task"], cohort["text"], cache)
    assert isinstance(again, ConceptEmbeddings) and again.concepts == CLASSES
    np.testing.assert_array_equal(again.embeddings, cohort["emb"].embeddings)
    assert len(list(cache.glob("zero-shot-zs-*.npy"))) == 1
