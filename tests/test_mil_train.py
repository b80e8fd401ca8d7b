"""Cohort training end to end on real Zarr feature stores written here; bad-input errors; checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr

from wsi_pipeline.errors import TrainingDataError
from wsi_pipeline.mil.bags import Bag, ZarrStore, all_finite, prefetch
from wsi_pipeline.mil.train import load_checkpoint, predict, train_task

DIM = 16
FAST = {
    "model": "abmil-gated",
    "hidden_dim": 16,
    "attn_dim": 8,
    "dropout": 0.0,
    "lr": 1e-2,
    "epochs": 12,
    "patience": 12,
    "folds": 3,
    "seeds": [0],
    "val_fraction": 0.25,
    "quiet": True,
    "batch_size": 2,
    "bootstrap": 50,
    "device": "cpu",
    "num_threads": 1,
}


def write_store(root, slide_id: str, feats: np.ndarray) -> None:
    """A feature store as stage 2 writes it: Zarr v3 group with features (float16) and coords (int64)."""
    group = zarr.open_group(str(root / f"{slide_id}.zarr"), mode="w")
    group.create_array("features", data=feats.astype(np.float16), chunks=(64, DIM))
    coords = np.stack([np.arange(len(feats)) * 224, np.zeros(len(feats))], 1).astype(np.int64)
    group.create_array("coords", data=coords)
    group.attrs.update({"encoder": "synthetic", "embed_dim": DIM})


def make_cohort(tmp_path, n_patients: int = 24, seed: int = 0):
    """Patients (some with two slides) whose bags carry a planted signal: label 1 / high risk -> key tiles."""
    rng = np.random.default_rng(seed)
    feats_dir = tmp_path / "features" / "synthetic"
    feats_dir.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        label = p % 2
        risk = rng.normal()
        time = float(np.exp(-risk) * 10 + rng.random())
        event = int(rng.random() < 0.8)
        for s in range(1 + (p % 5 == 0)):
            sid = f"P{p:02d}-S{s}"
            x = rng.normal(size=(int(rng.integers(20, 50)), DIM)).astype(np.float32)
            k = rng.choice(len(x), 6, replace=False)
            x[k, :4] += 2.5 * label
            x[k, 4:8] += 1.5 * risk
            write_store(feats_dir, sid, x)
            rows.append(
                {
                    "slide_id": sid,
                    "patient_id": f"P{p:02d}",
                    "diagnosis": ["benign", "tumour"][label],
                    "os_time": time,
                    "os_event": event,
                }
            )
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    return sheet, feats_dir


CLS_TASK = {"name": "dx", "type": "classification", "label": "diagnosis", "classes": ["benign", "tumour"]}
SURV_TASK = {"name": "os", "type": "survival", "time": "os_time", "event": "os_event"}


def test_classification_task_end_to_end(tmp_path):
    sheet, feats = make_cohort(tmp_path)
    out = tmp_path / "results" / "mil" / "dx"
    att = tmp_path / "results" / "attention" / "dx"
    res = train_task(sheet, feats, CLS_TASK, FAST, out, attention_dir=att)
    summary = res["summary"]
    assert summary["folds_done"] == 3 and summary["metrics"]["auc"]["mean"] > 0.8  # planted signal learnt
    lo, hi = summary["metrics"]["auc"]["ci_low"], summary["metrics"]["auc"]["ci_high"]
    assert lo <= summary["metrics"]["auc"]["pooled"] <= hi
    for name in ("splits.json", "config.json", "summary.json", "summary.csv", "folds.csv", "roc.png"):
        assert (out / name).stat().st_size > 0, name
    preds = pd.concat(pd.read_csv(out / f"fold{i:02d}" / "predictions.csv") for i in range(3))
    assert sorted(preds["patient_id"]) == sorted(f"P{p:02d}" for p in range(24))  # each patient tested once
    assert np.allclose(preds[["prob_benign", "prob_tumour"]].sum(1), 1)
    metrics = json.loads((out / "fold00" / "metrics.json").read_text())
    assert {"auc", "balanced_accuracy", "f1", "best_epoch", "history"} <= set(metrics)
    # attention: one store per slide (pooled patients split back), one score per tile, coords copied
    two_slides = zarr.open_group(str(att / "P00-S1.zarr"), mode="r")
    n_tiles = zarr.open_group(str(feats / "P00-S1.zarr"), mode="r")["features"].shape[0]
    assert two_slides["scores"].shape == (n_tiles,) and two_slides["coords"].shape == (n_tiles, 2)
    both = np.concatenate([zarr.open_group(str(att / f"P00-S{s}.zarr"))["scores"][:] for s in (0, 1)])
    assert both.sum() == pytest.approx(1.0, abs=1e-4)  # attention over the patient's bag
    assert len(list(att.glob("*.zarr"))) == len(pd.read_csv(sheet))

    # checkpoint round trip: a rebuilt model gives the same test predictions
    fold = out / "fold01"
    single = preds[(preds["fold"] == 1) & ~preds["slide_ids"].str.contains(";")]
    again = predict(fold, feats, single["slide_ids"].tolist(), tmp_path / "pred.csv", device="cpu")
    assert np.allclose(again["prob_tumour"].to_numpy(), single["prob_tumour"].to_numpy(), atol=1e-6)
    model, problem, meta = load_checkpoint(fold)
    assert problem.classes == ["benign", "tumour"] and meta["index"] == 1
    ensemble = predict(out, feats, ["P01-S0"], tmp_path / "ens.csv", device="cpu")
    assert ensemble["n_models"].iloc[0] == 3

    # re-running reuses finished folds (nothing retrained) and the split file
    stamp = (out / "fold00" / "metrics.json").stat().st_mtime_ns
    train_task(sheet, feats, CLS_TASK, FAST, out, fold=0, attention_dir=att)
    assert (out / "fold00" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_survival_task(tmp_path, loss):
    sheet, feats = make_cohort(tmp_path, n_patients=30)
    cfg = FAST | {"survival_loss": loss, "batch_size": 8, "epochs": 25, "patience": 25, "lr": 1e-2}
    res = train_task(sheet, feats, SURV_TASK, cfg, tmp_path / "os")
    c = res["summary"]["metrics"]["c_index"]
    assert c["mean"] > 0.6, c  # planted risk signal
    assert (tmp_path / "os" / "km.png").stat().st_size > 0
    preds = pd.read_csv(tmp_path / "os" / "fold00" / "predictions.csv")
    assert {"time", "event", "risk"} <= set(preds.columns)


def test_fold_without_events_is_undefined_not_half(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=12)
    df = pd.read_csv(sheet)
    df["os_event"] = (df["patient_id"] == "P03").astype(int)  # a single patient with an event ...
    df.loc[df["patient_id"] == "P03", "os_time"] = 0.01  # ... the first one: its fold has comparable pairs
    df.to_csv(sheet, index=False)
    res = train_task(sheet, feats, SURV_TASK, FAST | {"epochs": 2, "batch_size": 4}, tmp_path / "os")
    undefined = [f for f in res["folds"] if f["c_index"] is None]
    assert len(undefined) == 2 and all(f["c_index_undefined"] == "no observed events in this fold" for f in undefined)
    assert res["summary"]["metrics"]["c_index"]["n_folds"] == 1


def test_missing_features_listed_in_one_error(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=9)
    df = pd.read_csv(sheet)
    extra = pd.DataFrame(
        [
            {"slide_id": f"GHOST{i}", "patient_id": f"G{i}", "diagnosis": "benign", "os_time": 1.0, "os_event": 1}
            for i in range(3)
        ]
    )
    pd.concat([df, extra]).to_csv(sheet, index=False)
    with pytest.raises(TrainingDataError) as err:
        train_task(sheet, feats, CLS_TASK, FAST, tmp_path / "out")
    msg = str(err.value)
    assert "3 slide(s)" in msg and all(f"GHOST{i}" in msg for i in range(3)) and "\n" not in msg
    assert not (tmp_path / "out" / "fold00").exists()  # checked before any training


def test_bad_survival_values(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=9)
    df = pd.read_csv(sheet)
    bad_time = df.copy()
    bad_time.loc[0, "os_time"] = 0.0
    bad_time.to_csv(sheet, index=False)
    with pytest.raises(TrainingDataError, match="survival time must be > 0"):
        train_task(sheet, feats, SURV_TASK, FAST, tmp_path / "a")
    bad_event = df.copy()
    bad_event.loc[1, "os_event"] = 2
    bad_event.to_csv(sheet, index=False)
    with pytest.raises(TrainingDataError, match=r"event must be 0 \(censored\) or 1"):
        train_task(sheet, feats, SURV_TASK, FAST, tmp_path / "b")


def test_too_few_patients_per_class(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=12)
    df = pd.read_csv(sheet)
    df.loc[df["patient_id"].isin(["P01", "P03", "P05", "P07", "P09"]), "diagnosis"] = "benign"
    df.to_csv(sheet, index=False)  # one tumour patient left, 3 folds
    with pytest.raises(TrainingDataError, match="fewer patients than the 3 folds"):
        train_task(sheet, feats, CLS_TASK, FAST, tmp_path / "out")


def test_empty_bag_and_non_finite_features(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=9)
    out = tmp_path / "out"
    train_task(sheet, feats, CLS_TASK, FAST | {"epochs": 2}, out, fold=0)  # one fold done before the damage
    done = (out / "fold00" / "metrics.json").read_text()
    bad = np.random.default_rng(0).normal(size=(30, DIM))
    bad[3, 2] = np.nan
    write_store(feats, "P04-S0", bad)
    with pytest.raises(TrainingDataError, match="P04-S0.zarr: features contain NaN or infinity"):
        train_task(sheet, feats, CLS_TASK, FAST | {"epochs": 2}, out)
    assert (out / "fold00" / "metrics.json").read_text() == done  # nothing trained so far is lost
    write_store(feats, "P04-S0", np.zeros((0, DIM)))
    with pytest.raises(TrainingDataError, match="P04-S0.zarr: empty bag"):
        train_task(sheet, feats, CLS_TASK, FAST, out)


def test_read_ahead_matches_the_plain_loop(tmp_path):
    """Bags read by background threads arrive in order, and training on them is bit-identical to reading in line."""
    sheet, feats = make_cohort(tmp_path, n_patients=12)
    store = ZarrStore(feats, cache_bytes=0)
    bags = [Bag(p.stem, [p.stem]) for p in sorted(feats.glob("*.zarr"))]
    store.check(bags)
    plain = [store.load(b) for b in bags]
    ahead = list(prefetch(store, bags, threads=3, ahead=4))
    assert len(ahead) == len(plain) and all(np.array_equal(a, b) for a, b in zip(ahead, plain, strict=True))
    reader = prefetch(store, bags, threads=2, ahead=4)
    assert np.array_equal(next(reader), plain[0])
    reader.close()  # a consumer that stops early (an error mid-epoch) leaves no reader threads behind
    runs = {}
    for threads in (0, 3):
        out = tmp_path / f"out{threads}"
        train_task(
            sheet, feats, CLS_TASK, FAST | {"loader_threads": threads, "cache_bytes": 0, "folds": 2}, out, fold=0
        )
        runs[threads] = (out / "fold00" / "predictions.csv").read_text()
    assert runs[0] == runs[3]


def test_all_finite_matches_numpy_on_float16_edge_values():
    edge = np.array([0.0, -0.0, 6e-8, 65504.0, -65504.0, np.inf, -np.inf, np.nan], dtype=np.float16)
    for value in edge:
        x = np.ones((7, 5), dtype=np.float16)
        x[3, 2] = value
        assert all_finite(x) == bool(np.isfinite(x).all()) == bool(np.isfinite(value))
        assert all_finite(x.astype(np.float32)) == bool(np.isfinite(value))


def reader_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("bag-reader")]


def test_damaged_store_mid_epoch_is_named_and_stops_the_readers(tmp_path):
    """A chunk damaged after the metadata check: one clear error naming the store, and no reader thread left."""
    sheet, feats = make_cohort(tmp_path, n_patients=12)
    chunk = feats / "P05-S0.zarr" / "features" / "c" / "0" / "0"
    assert chunk.exists()
    chunk.write_bytes(b"not a zstd frame" * 4)
    with pytest.raises(TrainingDataError, match=r"P05-S0\.zarr: cannot read array 'features'.*re-run feature"):
        train_task(sheet, feats, CLS_TASK, FAST | {"loader_threads": 3, "cache_bytes": 0}, tmp_path / "out")
    assert not reader_threads()


def test_a_failing_training_step_stops_the_readers_at_once(tmp_path):
    """The error comes from the consumer (a model built for another feature width), not from a read: the epoch's
    reader is a local the traceback keeps alive, so only an explicit close stops its threads."""
    from wsi_pipeline.mil.config import TrainConfig
    from wsi_pipeline.mil.engine import Problem, fit

    _, feats = make_cohort(tmp_path, n_patients=12)
    store = ZarrStore(feats)
    bags = [Bag(p.stem, [p.stem], label=i % 2) for i, p in enumerate(sorted(feats.glob("*.zarr")))]
    store.check(bags)
    spec = {"model": "abmil-gated", "in_dim": DIM + 1, "n_out": 2, "hidden_dim": 8, "attn_dim": 4}
    cfg = TrainConfig(**(FAST | {"loader_threads": 3}))
    with pytest.raises(RuntimeError, match="shape") as caught:  # held, as a caller that logs the error holds it
        fit(spec, store, bags, [], Problem("classification", "ce", 2, ["a", "b"]), cfg)
    assert caught.tb is not None and not reader_threads()
