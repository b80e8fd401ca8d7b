"""Concept profiles under attention and the cohort statistics: known answers by hand, scipy as the reference for
every test statistic, one-line errors for stores that do not line up, and stage 3's real outputs as input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import special, stats

from wsi_pipeline.errors import FeatureError
from wsi_pipeline.explain.profiles import (
    HIGH,
    LOW,
    Attention,
    SetProfile,
    align_rows,
    attention_weights,
    bh_qvalues,
    cliffs_delta,
    compare_groups,
    concept_table,
    contrasts,
    holds_logits,
    profile_set,
    read_attention,
    top_tiles,
    write_csv_atomic,
)
from wsi_pipeline.explain.store import ConceptScores
from wsi_pipeline.explain.task import slide_predictions
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.train import train_task

ATT, CON = Path("attention/dx/s.zarr"), Path("explain/enc/tissue/s.zarr")


def grid(n: int) -> np.ndarray:
    return np.stack([np.arange(n) % 7 * 256, np.arange(n) // 7 * 256], 1).astype(np.int64)


def test_weighted_profile_by_hand_with_rows_matched_by_coords() -> None:
    coords = grid(4)
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.85, 0.1, 0.05]])
    perm = np.array([2, 0, 3, 1])  # the concept store lists the tiles in another order
    scores = ConceptScores(["tumour", "stroma", "fat"], probs[perm] * 0, coords[perm], probs[perm])
    att = Attention(np.array([3.0, 1.0, 0.0, 4.0]), coords)
    weights = attention_weights(att.scores, ATT)
    np.testing.assert_allclose(weights, [0.375, 0.125, 0.0, 0.5])
    p = profile_set("tissue", weights, att, ATT, scores, CON)
    assert p.score_kind == "probs"  # the softmax over the set wins over the cosine when stored
    # by hand: weighted = sum_i a_i s_i, mean over the four tiles, enrichment = weighted - mean
    np.testing.assert_allclose(p.weighted, [0.775, 0.16875, 0.05625], atol=1e-6)
    np.testing.assert_allclose(p.mean, [0.5125, 0.2875, 0.2], atol=1e-6)
    np.testing.assert_allclose(p.enrichment, [0.2625, -0.11875, -0.14375], atol=1e-6)
    np.testing.assert_allclose(p.tile_scores, probs)  # aligned back to the attention's rows
    assert [c["concept"] for c in p.to_json()["top_concepts"]] == ["tumour", "stroma", "fat"]


def test_attention_on_high_x_tiles_makes_x_the_most_enriched() -> None:
    rng = np.random.default_rng(3)
    n, c, x = 300, 6, 4
    cos = rng.normal(0.2, 0.02, (n, c))
    hot = np.argsort(-cos[:, x])[:12]  # the tiles most like concept X
    raw = np.full(n, 1e-4)
    raw[hot] = 1.0
    coords = grid(n)
    scores = ConceptScores([f"c{i}" for i in range(c)], cos.astype(np.float32), coords)
    att = Attention(raw, coords)
    weights = attention_weights(raw, ATT)
    p = profile_set("set", weights, att, ATT, scores, CON)
    assert p.score_kind == "cosine" and p.top_concepts(1) == [x] and p.enrichment[x] > 3 * np.abs(p.enrichment).min()
    tiles = top_tiles(weights, coords, {"set": p}, 5, captions=["first", "second"])
    assert {(t["x"], t["y"]) for t in tiles} <= {tuple(coords[i]) for i in hot}
    assert all(t["concepts"]["set"][0]["concept"] == f"c{x}" for t in tiles)
    assert [t.get("caption") for t in tiles] == ["first", "second", None, None, None]
    assert sum(t["attention"] for t in tiles) == pytest.approx(5 / (12 + 288e-4), rel=1e-9)


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda c: c[:-1], "9 concept rows, 10 attention rows, 1 attention tiles without"),
        (lambda c: np.concatenate([c[:-1], [[5000, 5000]]]), "10 concept rows, 10 attention rows, 1 attention"),
        (lambda c: np.concatenate([c[:-1], c[:1]]), "lists a tile origin twice"),
    ],
)
def test_misaligned_stores_are_one_line(change, expect: str) -> None:
    coords = grid(10)
    with pytest.raises(FeatureError) as err:
        align_rows(coords, change(coords.copy()), ATT, CON)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(CON)) and expect in msg and "rerun `wsi-pipeline concepts`" in msg


def test_attention_without_coords_matches_by_row_order_only() -> None:
    coords = grid(5)
    np.testing.assert_array_equal(align_rows(None, coords, ATT, CON), np.arange(5))
    scores = ConceptScores(["a"], np.ones((4, 1), np.float32), grid(4))
    with pytest.raises(FeatureError, match="4 concept rows but 5 attention rows"):
        profile_set("s", np.full(5, 0.2), Attention(np.ones(5), None), ATT, scores, CON)


def test_zero_shot_logits_weigh_by_their_softmax() -> None:
    logits = np.array([-3.0, 12.5, 11.0, 0.0])  # logit_scale x cosine: any sign
    assert holds_logits({"score": "logit_scale * cosine ..."}) and not holds_logits({"model": "abmil"})
    np.testing.assert_allclose(attention_weights(logits, ATT, logits=True), special.softmax(logits), atol=1e-12)
    with pytest.raises(FeatureError, match="attention must be finite"):
        attention_weights(np.array([1.0, np.inf]), ATT, logits=True)


@pytest.mark.parametrize("bad", [[0.0, 0.0], [1.0, np.nan], [1.0, -0.5], []])
def test_unusable_attention_is_one_line(bad: list[float]) -> None:
    with pytest.raises(FeatureError, match=r"attention must be finite, non-negative and not all zero.*retrain"):
        attention_weights(np.array(bad), ATT)


def test_cliffs_delta_equals_the_pairwise_definition_and_mann_whitney_u() -> None:
    rng = np.random.default_rng(0)
    a, b = np.round(rng.normal(0.3, 1, (15, 4)), 1), np.round(rng.normal(0, 1, (11, 4)), 1)  # with ties
    delta = cliffs_delta(a, b, axis=0)
    by_hand = [np.sign(a[:, None, j] - b[None, :, j]).mean() for j in range(4)]
    np.testing.assert_allclose(delta, by_hand, atol=1e-12)
    u = stats.mannwhitneyu(a, b, axis=0).statistic
    np.testing.assert_allclose(delta, 2 * u / (15 * 11) - 1, atol=1e-12)


def test_compare_groups_against_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 1, (20, 3)), rng.normal(0, 1, (17, 3))
    res = compare_groups(a, b, n_boot=300, seed=7)
    np.testing.assert_allclose(res["p"], stats.mannwhitneyu(a, b, axis=0, alternative="two-sided").pvalue)
    np.testing.assert_allclose(res["mean_diff"], a.mean(0) - b.mean(0))
    assert (res["ci_low"] <= res["cliffs_delta"]).all() and (res["cliffs_delta"] <= res["ci_high"]).all()
    # one concept: the very call scipy documents, same resamples (seeded), same interval
    one = compare_groups(a[:, :1], b[:, :1], n_boot=300, seed=7)
    ref = stats.bootstrap(
        (a[:, 0], b[:, 0]),
        lambda x, y, axis: cliffs_delta(x, y, axis=axis),
        n_resamples=300,
        method="percentile",
        rng=np.random.default_rng(7),
        vectorized=True,
    ).confidence_interval
    np.testing.assert_allclose([one["ci_low"][0], one["ci_high"][0]], [ref.low, ref.high])
    again = compare_groups(a, b, n_boot=300, seed=7)
    np.testing.assert_array_equal(again["ci_low"], res["ci_low"])  # seeded: the same interval every run
    tiny = compare_groups(a[:1], b, n_boot=300)  # a group of one: no test, no interval
    assert np.isnan(tiny["p"]).all() and np.isnan(tiny["ci_low"]).all() and np.isfinite(tiny["mean_a"]).all()


def test_benjamini_hochberg_equals_the_hand_formula() -> None:
    p = np.random.default_rng(2).uniform(0, 0.2, 25) ** 2
    p[[3, 9]] = np.nan  # undefined tests stay out of the family
    q = bh_qvalues(p)
    ok = np.isfinite(p)
    ps = p[ok]
    m, order = len(ps), np.argsort(ps)
    scaled = ps[order] * m / np.arange(1, m + 1)
    by_hand = np.empty(m)
    by_hand[order] = np.minimum(1, np.minimum.accumulate(scaled[::-1])[::-1])  # q_(i) = min_{j>=i} p_(j) m / j
    np.testing.assert_allclose(q[ok], by_hand, atol=1e-12)
    assert np.isnan(q[~ok]).all()


def profiles_for(enrichment: np.ndarray, names: list[str]) -> SetProfile:
    zero = np.zeros(len(names))
    return SetProfile("set", "probs", names, np.zeros((0, len(names))), zero, zero, enrichment)


def test_a_separating_concept_is_found_with_its_sign_and_a_null_one_is_not() -> None:
    rng = np.random.default_rng(5)
    slides, profiles = [], {}
    for i in range(40):
        label = ["benign", "tumour"][i % 2]
        for s in range(1 + (i % 4 == 0)):  # some patients with two slides: counted once
            sid = f"p{i}-s{s}"
            enrich = np.array([0.02 * (label == "tumour") + rng.normal(0, 0.01), rng.normal(0, 0.01)])
            slides.append({"slide_id": sid, "patient_id": f"p{i}", "group": label})
            profiles[sid] = {"set": profiles_for(enrich, ["X", "null"])}
    table = concept_table(slides, profiles, "classification", ["benign", "tumour"], n_boot=200, fdr=0.05)
    x, null = table.set_index("concept").loc["X"], table.set_index("concept").loc["null"]
    assert x["contrast"] == "tumour vs benign" and x["n_a"] + x["n_b"] == 40
    assert x["significant"] and x["cliffs_delta"] > 0.5 and x["ci_low"] > 0 and x["mean_a"] > x["mean_b"]
    assert not null["significant"] and null["ci_low"] < 0 < null["ci_high"]
    np.testing.assert_allclose(table["q"], stats.false_discovery_control(table["p"], method="bh"))
    # the other sign: benign as group A
    flipped = concept_table(slides, profiles, "classification", ["tumour", "benign"], n_boot=0, fdr=0.05)
    assert flipped.set_index("concept").loc["X", "cliffs_delta"] == pytest.approx(-x["cliffs_delta"])
    assert flipped["ci_low"].isna().all()  # bootstrap 0: no interval


def test_contrasts_per_task_type() -> None:
    assert contrasts("classification", ["a", "b"]) == [("b vs a", ["b"], ["a"])]
    assert [c[0] for c in contrasts("classification", ["a", "b", "c"])] == ["a vs rest", "b vs rest", "c vs rest"]
    assert contrasts("classification", ["a", "b", "c"])[1][2] == ["a", "c"]
    assert contrasts("survival", []) == [(f"{HIGH} vs {LOW}", [HIGH], [LOW])]


def test_csv_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "explain" / "concepts.csv"
    write_csv_atomic(path, pd.DataFrame({"a": [1.0, 2.0]}))
    write_csv_atomic(path, pd.DataFrame({"a": [3.0]}))
    assert pd.read_csv(path)["a"].tolist() == [3.0] and [p.name for p in path.parent.iterdir()] == ["concepts.csv"]


def test_survival_groups_are_a_median_split_within_each_fold(tmp_path: Path) -> None:
    for index, risks in ((0, [0.1, 0.5, 0.9, 0.7]), (1, [5.0, 1.0, 3.0])):  # folds on different risk scales
        ids = [f"{index}{k}" for k in range(len(risks))]
        rows = pd.DataFrame({"bag_id": ids, "patient_id": ids, "slide_ids": [f"s{i}" for i in ids], "risk": risks})
        rows = rows.assign(index=index, seed=0, fold=index, time=1.0, event=1)
        (tmp_path / f"fold{index:02d}").mkdir()
        rows.to_csv(tmp_path / f"fold{index:02d}" / "predictions.csv", index=False)
    groups = slide_predictions(tmp_path, "survival")["group"]
    assert groups.loc[(0, "s02")] == HIGH and groups.loc[(0, "s03")] == HIGH and groups.loc[(0, "s01")] == LOW
    assert groups.loc[(1, "s10")] == HIGH and groups.loc[(1, "s12")] == LOW  # 3.0 is the median: not above it


def test_stage_three_outputs_line_up(tmp_path: Path) -> None:
    """A real (tiny) training run: every attention store finds its prediction row and its feature rows."""
    rng = np.random.default_rng(0)
    feats = tmp_path / "features"
    feats.mkdir()
    rows = []
    for p in range(12):
        for s in range(1 + (p == 0)):
            sid = f"P{p:02d}-S{s}"
            n = int(rng.integers(15, 30))
            x = rng.normal(size=(n, 8)).astype(np.float32)
            x[:4, :4] += 2.0 * (p % 2)
            g = zarr.open_group(str(feats / f"{sid}.zarr"), mode="w")
            g.create_array("features", data=x)
            g.create_array("coords", data=grid(n))
            rows.append({"slide_id": sid, "patient_id": f"P{p:02d}", "dx": ["benign", "tumour"][p % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "sheet.csv", index=False)
    task = {"name": "dx", "type": "classification", "label": "dx", "classes": ["benign", "tumour"]}
    train = TrainConfig(hidden_dim=8, attn_dim=4, epochs=2, patience=2, folds=3, quiet=True, bootstrap=0)
    train = train.model_copy(update={"device": "cpu", "num_threads": 1, "val_fraction": 0.25})
    out, att_dir = tmp_path / "mil" / "dx", tmp_path / "attention" / "dx"
    train_task(tmp_path / "sheet.csv", feats, task, train, out, attention_dir=att_dir)
    preds = slide_predictions(out, "classification")
    for row in rows:
        att = read_attention(att_dir / f"{row['slide_id']}.zarr")
        hit = preds.loc[(att.attrs["index"], row["slide_id"])]
        assert hit["label"] == row["dx"] == hit["group"] and hit["patient_id"] == row["patient_id"]
        assert att.coords is not None
        n = len(att.coords)
        scores = ConceptScores(["a", "b"], rng.random((n, 2)).astype(np.float32), att.coords[::-1].copy())
        prof = profile_set("s", attention_weights(att.scores, ATT), att, ATT, scores, CON)
        np.testing.assert_allclose(prof.tile_scores, scores.cosine[::-1])
