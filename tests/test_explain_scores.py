"""Stage 4 tile concept scores on real stores: synthetic slides tiled and encoded by the real stages with a tiny
ConceptCLIP-like model (both towers, remote code), scored against concept sets from YAML; the feature check against
the model's own logits, on that model and on one whose logits project the pooled output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from test_encode_engine import tiled_synthetic
from tiny_models import make_tiny_dual_conceptclip

from wsi_pipeline import __version__
from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encoders import EncoderConfig, build_encoder
from wsi_pipeline.encoders.text import TextEncoder, build_text_encoder
from wsi_pipeline.errors import FeatureError
from wsi_pipeline.explain.concepts import load_concept_set
from wsi_pipeline.explain.feature_check import (
    MISMATCH,
    NOT_CHECKED,
    VERIFIED,
    FeatureCheck,
    check_cache_path,
    cohort_feature_check,
    image_model_key,
    verify_feature_alignment,
)
from wsi_pipeline.explain.scores import block_rows, score_cohort, score_slide
from wsi_pipeline.explain.similarity import cosine_block, softmax_at_scale, softmax_block, tile_cosine
from wsi_pipeline.explain.store import read_concept_scores
from wsi_pipeline.explain.text_cache import ConceptEmbeddings, concept_embeddings, text_model_key
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.tiling.table import read_tile_table

ENC = "conceptclip"
SLIDES = ["s1", "s2", "s3"]


def concept_set_file(root: Path, prompts: Sequence[str] = ("tumour cells", "dense stroma", "necrosis")) -> Path:
    data = {
        "name": "mini",
        "templates": ["an h&e image of {}.", "a histology tile showing {}."],
        "concepts": [{"name": p.split()[-1], "prompts": [p]} for p in prompts],
    }
    path = root / "mini.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cfg_for(model: Path) -> EncoderConfig:
    return EncoderConfig(name=ENC, path=str(model), trust_remote_code=True)


def encoded_cohort(root: Path, model: Path, slides: Sequence[str] = SLIDES) -> Path:
    """Synthetic slides tiled (stage 1) and encoded (stage 2) with `model` into `root/results`."""
    results = root / "results"
    for i, sid in enumerate(slides):
        tiled_synthetic(root, sid, seed=i + 1)
        side = encode_slide(results, sid, cfg_for(model))
        assert side.status == "ok", side
    return results


def features_of(results: Path, sid: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    g = zarr.open_group(str(ResultsLayout(results).feature_store(ENC, sid)), mode="r")
    return np.asarray(g["features"][...]), np.asarray(g["coords"][...]), dict(g.attrs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scores")
    model = make_tiny_dual_conceptclip(root / "dual")
    results = encoded_cohort(root, model)
    text = build_text_encoder(cfg_for(model))
    emb = concept_embeddings(text, load_concept_set(concept_set_file(root)), None)
    return {"root": root, "model": model, "results": results, "text": text, "emb": emb}


def copy_results(world: dict[str, Any], dst: Path) -> Path:
    shutil.copytree(world["results"], dst / "results")
    return dst / "results"


def test_scores_equal_numpy_in_tile_order(world: dict[str, Any], tmp_path: Path) -> None:
    results, emb = copy_results(world, tmp_path), world["emb"]
    check = cohort_feature_check(results, cfg_for(world["model"]), SLIDES, emb)
    table = score_cohort(results, ENC, SLIDES, emb, feature_check=check)
    assert table["status"].tolist() == ["ok"] * 3 and not table["reused"].any()
    layout = ResultsLayout(results)
    for sid in SLIDES:
        feats, coords, fattrs = features_of(results, sid)
        scores = read_concept_scores(layout.concept_store(ENC, "mini", sid))
        x = feats.astype(np.float64)
        expect_cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ emb.embeddings.astype(np.float64).T
        np.testing.assert_allclose(scores.cosine, expect_cos, rtol=0, atol=1e-5)
        logits = emb.logit_scale * expect_cos + (emb.logit_bias or 0.0)
        expect_probs = np.exp(logits - logits.max(1, keepdims=True))
        expect_probs /= expect_probs.sum(1, keepdims=True)
        assert scores.probs is not None
        np.testing.assert_allclose(scores.probs, expect_probs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(scores.probs.sum(1), 1.0, atol=1e-5)
        # rows in the tile store's order
        np.testing.assert_array_equal(scores.coords, coords)
        np.testing.assert_array_equal(scores.coords, read_tile_table(layout.tile_store(sid)).coords)
        a = scores.attrs
        assert a["concepts"] == ["cells", "stroma", "necrosis"] == scores.concepts and a["concept_set"] == "mini"
        assert a["prompt_hash"] == emb.prompt_hash and a["logit_scale"] == pytest.approx(emb.logit_scale)
        assert a["logit_bias"] == pytest.approx(-1.0) and a["text_encoder"]["tower"] == "text"
        prov = fattrs["provenance"]
        assert a["image_features"]["weights_sha256"] == prov["weights_sha256"] == a["text_encoder"]["weights_sha256"]
        assert a["image_features"]["encoder"] == ENC and a["image_features"]["revision"] == prov["revision"]
        assert a["image_features"]["created"] == fattrs["created"] and a["tile_geometry"] == fattrs["tile_geometry"]
        assert a["package_version"] == __version__ and a["n_tiles"] == len(coords) and a["complete"] is True
        assert a["feature_check"]["status"] == VERIFIED and a["feature_check"]["tiles"] == 8
        side = json.loads(layout.concept_sidecar(ENC, "mini", sid).read_text())
        assert side["status"] == "ok" and side["n_tiles"] == len(coords) and side["prompt_hash"] == emb.prompt_hash
        assert side["store"] == f"explain/{ENC}/mini/{sid}.zarr" and side["feature_check"] == VERIFIED
    summary = layout.concept_summary(ENC, "mini").read_text().splitlines()
    assert summary[0] == "slide_id,status,n_tiles,reason,reused" and len(summary) == 4


def test_out_of_core_blocks_smaller_than_a_slide(world: dict[str, Any], tmp_path: Path) -> None:
    """Blocks of 16 rows (several per slide) give the numbers of one block per slide."""
    results, emb = copy_results(world, tmp_path), world["emb"]
    layout = ResultsLayout(results)
    feats = zarr.open_group(str(layout.feature_store(ENC, "s1")), mode="r")["features"]
    assert isinstance(feats, zarr.Array)
    assert block_rows(feats, 16) == 16 < feats.shape[0]
    assert block_rows(feats, 10_000) % (feats.shards or feats.chunks)[0] == 0  # whole shards
    score_cohort(results, ENC, SLIDES, emb, chunk_rows=16)
    small = {s: read_concept_scores(layout.concept_store(ENC, "mini", s)) for s in SLIDES}
    score_cohort(results, ENC, SLIDES, emb, chunk_rows=16384, force=True)
    for sid in SLIDES:
        big = read_concept_scores(layout.concept_store(ENC, "mini", sid))
        np.testing.assert_allclose(small[sid].cosine, big.cosine, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(small[sid].coords, big.coords)


def test_resume_reuses_and_changes_rescore(world: dict[str, Any], tmp_path: Path) -> None:
    results, emb = copy_results(world, tmp_path), world["emb"]
    layout = ResultsLayout(results)
    score_cohort(results, ENC, SLIDES, emb)
    created = {s: read_concept_scores(layout.concept_store(ENC, "mini", s)).attrs["created"] for s in SLIDES}
    zjson = layout.concept_store(ENC, "mini", "s1") / "zarr.json"
    stamp = zjson.stat().st_mtime_ns
    again = score_cohort(results, ENC, SLIDES, emb)
    assert again["reused"].all() and again["status"].tolist() == ["ok"] * 3
    assert zjson.stat().st_mtime_ns == stamp  # not rewritten
    # an edited prompt re-scores (the prompt hash changes), the same set name
    edited_dir = tmp_path / "edited"
    edited_dir.mkdir()
    edited = concept_embeddings(
        world["text"], load_concept_set(concept_set_file(edited_dir, ("tumour cells", "pink stroma", "necrosis"))), None
    )
    assert edited.prompt_hash != emb.prompt_hash
    table = score_cohort(results, ENC, SLIDES, edited)
    assert not table["reused"].any()
    assert read_concept_scores(layout.concept_store(ENC, "mini", "s1")).attrs["prompt_hash"] == edited.prompt_hash
    # a re-encoded slide (a new feature store) re-scores that slide only, even re-encoded within the second its
    # scores were made (same `created` stamp: the store's id tells them apart); force re-scores all
    old = zarr.open_group(str(layout.feature_store(ENC, "s2")), mode="r").attrs.asdict()
    encode_slide(results, "s2", cfg_for(world["model"]), force=True)
    store = zarr.open_group(str(layout.feature_store(ENC, "s2")), mode="r+")
    assert store.attrs["store_id"] != old["store_id"]
    store.attrs["created"] = old["created"]
    table = score_cohort(results, ENC, SLIDES, edited)
    assert table.set_index("slide_id")["reused"].to_dict() == {"s1": True, "s2": False, "s3": True}
    forced = score_cohort(results, ENC, SLIDES, edited, force=True)
    assert not forced["reused"].any()
    assert read_concept_scores(layout.concept_store(ENC, "mini", "s3")).attrs["created"] >= created["s3"]


def test_features_of_another_model_are_refused(world: dict[str, Any], tmp_path: Path) -> None:
    other = make_tiny_dual_conceptclip(tmp_path / "other", seed=1)
    results = encoded_cohort(tmp_path, other, ["s1"])
    side = score_slide(results, ENC, "s1", world["emb"])
    assert side.status == "failed" and "\n" not in side.reason
    image_sha = features_of(results, "s1")[2]["weights_sha256"]
    text_sha = world["emb"].text_provenance["weights_sha256"]
    assert image_sha != text_sha
    assert image_sha[:12] in side.reason and text_sha[:12] in side.reason and "encode the slides" in side.reason
    assert not ResultsLayout(results).concept_store(ENC, "mini", "s1").exists()
    table = score_cohort(results, ENC, ["s1"], world["emb"])
    assert table["status"].tolist() == ["failed"] and table["reason"][0] == side.reason


def test_missing_incomplete_empty_and_broken_stores(world: dict[str, Any], tmp_path: Path) -> None:
    results, emb = copy_results(world, tmp_path), world["emb"]
    layout = ResultsLayout(results)
    # s2's store left unfinished (as a killed writer would), s3's features hold a NaN row, s9 was never encoded
    zarr.open_group(str(layout.feature_store(ENC, "s2")), mode="r+").attrs["complete"] = False
    g = zarr.open_group(str(layout.feature_store(ENC, "s3")), mode="r+")
    row = np.asarray(g["features"][5])
    row[:] = np.nan
    g["features"][5] = row
    # a blank slide: stage 1 finds no tissue, stage 2 writes an empty store
    tiled_synthetic(tmp_path, "blank", regions=())
    assert encode_slide(results, "blank", cfg_for(world["model"])).status == "no tissue"
    table = score_cohort(results, ENC, ["s1", "s2", "s3", "s9", "blank"], emb).set_index("slide_id")
    assert table["status"].to_dict() == {
        "s1": "ok",
        "s2": "skipped",
        "s3": "failed",
        "s9": "skipped",
        "blank": "no tissue",
    }
    assert (
        "no complete feature store" in table.loc["s2", "reason"] and "wsi-pipeline encode" in table.loc["s2", "reason"]
    )
    assert "stage 2: ok" in table.loc["s2", "reason"]  # what stage 2's sidecar said
    assert "stage 2" not in table.loc["s9", "reason"] and "no complete feature store" in table.loc["s9", "reason"]
    reason = table.loc["s3", "reason"]
    assert "\n" not in reason and "NaN" in reason and "row 5" in reason and "s3.zarr" in reason
    assert "encode --force" in reason
    assert read_concept_scores(layout.concept_store(ENC, "mini", "s1")).n_tiles > 0  # the window's others finish
    assert not layout.concept_store(ENC, "mini", "s3").exists()
    assert not list(layout.concept_dir(ENC, "mini").glob("*.tmp-*"))
    assert read_concept_scores(layout.concept_store(ENC, "mini", "blank")).n_tiles == 0


def test_one_concept_has_no_softmax(world: dict[str, Any], tmp_path: Path) -> None:
    results = copy_results(world, tmp_path)
    one = concept_embeddings(world["text"], load_concept_set(concept_set_file(tmp_path, ("tumour cells",))), None)
    score_cohort(results, ENC, ["s1"], one)
    scores = read_concept_scores(ResultsLayout(results).concept_store(ENC, "mini", "s1"))
    assert scores.probs is None and scores.cosine.shape[1] == 1 and scores.attrs["softmax"] is False


def test_feature_check_verified_cached_and_not_checked(world: dict[str, Any], tmp_path: Path) -> None:
    results, emb, cfg = copy_results(world, tmp_path), world["emb"], cfg_for(world["model"])
    check = cohort_feature_check(results, cfg, SLIDES, emb)
    assert check.status == VERIFIED and check.method == "forward" and check.tiles == 8 and check.slide_id == "s1"
    assert check.max_abs_logit_diff is not None and check.tolerance is not None
    assert check.max_abs_logit_diff <= check.tolerance and check.max_abs_cos_diff < 1e-3  # fp16 storage
    assert check.model_logit_scale == pytest.approx(emb.logit_scale)
    prov = features_of(results, "s1")[2]["provenance"]
    cache = check_cache_path(results, ENC, image_model_key(prov), text_model_key(emb.text_provenance))
    assert cache.parent == ResultsLayout(results).text_cache_dir(ENC) and cache.is_file()
    # the slide files moved away: the check itself cannot run, but the cached result answers without a model
    table = read_tile_table(ResultsLayout(results).tile_store("s1"))
    slide = Path(table.attrs["slide_path"])
    moved = slide.with_suffix(".moved")
    slide.rename(moved)
    try:
        direct = verify_feature_alignment(results, ENC, "s1", build_encoder(cfg), emb)
        assert direct.status == NOT_CHECKED and "cannot be read again" in direct.reason and "\n" not in direct.reason
        cached = cohort_feature_check(results, cfg, ["s1"], emb)
        assert cached == check
        rerun = cohort_feature_check(results, cfg, ["s1"], emb, force=True)
        assert rerun.status == NOT_CHECKED
    finally:
        moved.rename(slide)


def test_feature_check_catches_a_projected_pooled_output(tmp_path: Path) -> None:
    """A model whose logits use a projection of the pooled output: stored (pooled) features are not the logits'."""
    model = make_tiny_dual_conceptclip(tmp_path / "projected", project_pooled=True)
    results = encoded_cohort(tmp_path, model, ["s1"])
    cfg = cfg_for(model)
    emb = concept_embeddings(build_text_encoder(cfg), load_concept_set(concept_set_file(tmp_path)), None)
    check = cohort_feature_check(results, cfg, ["s1"], emb)
    assert check.status == MISMATCH and check.max_abs_logit_diff > check.tolerance  # type: ignore[operator]
    assert "projection applied after the pooled output" in check.reason and "\n" not in check.reason
    assert not check_cache_path(results, ENC, check.image_model or "", check.text_model or "").exists()
    with pytest.raises(FeatureError) as err:
        score_cohort(results, ENC, ["s1"], emb, feature_check=check)
    assert "\n" not in str(err.value) and "not what the text side expects" in str(err.value)
    assert not ResultsLayout(results).concept_dir(ENC, "mini").exists()


class CountingText(TextEncoder):
    """A real text tower that counts its calls (to see the embedding cache answer instead)."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner, self.calls = inner, 0
        self.name, self.embed_dim, self.device = inner.name, inner.embed_dim, inner.device
        self.context_length, self.logit_scale, self.logit_bias = (
            inner.context_length,
            inner.logit_scale,
            inner.logit_bias,
        )

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        return self.inner.encode_text(prompts)

    def provenance(self) -> dict[str, Any]:
        return self.inner.provenance()


def test_text_embeddings_cached_per_model_and_prompts(world: dict[str, Any], tmp_path: Path) -> None:
    results = copy_results(world, tmp_path)
    cache = ResultsLayout(results).text_cache_dir(ENC)
    text = CountingText(world["text"])
    concept_set = load_concept_set(concept_set_file(tmp_path))
    first = concept_embeddings(text, concept_set, cache)
    assert text.calls == 1
    second = concept_embeddings(text, concept_set, cache)
    assert text.calls == 1  # read from the cache
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    table = score_cohort(results, ENC, SLIDES, second)
    assert table["status"].tolist() == ["ok"] * 3


def test_cosine_and_softmax_blocks_match_the_reference() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((700, 48)).astype(np.float16)
    text = rng.standard_normal((5, 48)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    cos = cosine_block(feats, text.T)
    np.testing.assert_allclose(cos, tile_cosine(feats, text), rtol=0, atol=1e-6)
    np.testing.assert_allclose(softmax_block(cos, 30.0, -2.0), softmax_at_scale(cos, 30.0, -2.0), atol=1e-6)
    feats[433, 7] = np.inf
    with pytest.raises(FeatureError, match=r"store.zarr: 1 tile features contain NaN or inf \(first: row 1433"):
        cosine_block(feats, text.T, "store.zarr", first_row=1000)
    feats[433] = 0
    with pytest.raises(FeatureError, match="all zero"):
        cosine_block(feats, text.T)


def test_feature_check_roundtrip_and_unaligned_is_one_line() -> None:
    check = FeatureCheck(MISMATCH, 3.5, 8, "the logits use another vector", slide_id="s1")
    assert FeatureCheck.from_dict({**check.to_dict(), "future_field": 1}) == check
    with pytest.raises(FeatureError, match="feature check on slide s1: the logits use another vector"):
        check.require_aligned()
    FeatureCheck(NOT_CHECKED).require_aligned()  # no check is recorded as such, not refused


def test_text_embeddings_of_another_width_are_refused(world: dict[str, Any], tmp_path: Path) -> None:
    results, emb = copy_results(world, tmp_path), world["emb"]
    narrow = ConceptEmbeddings(
        emb.concept_set, emb.concepts, np.eye(3, 16, dtype=np.float32), emb.prompt_hash, 10.0, None, emb.text_provenance
    )
    side = score_slide(results, ENC, "s1", narrow)
    assert side.status == "failed" and "48-d" in side.reason and "16-d" in side.reason and "\n" not in side.reason
