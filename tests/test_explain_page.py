"""Stage 4 end to end on real parts: synthetic slides tiled by stage 1, attention written by stage 3's writer,
concept stores by stage 4's, fold predictions in stage 3's format -> `explain_task` -> slide JSONs, concepts.csv,
heatmaps, tile crops and the HTML page, rendered in headless Chromium and looked at pixel by pixel."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from wsi_pipeline.errors import FeatureError
from wsi_pipeline.explain.config import ExplainConfig
from wsi_pipeline.explain.page import render_page
from wsi_pipeline.explain.profiles import HIGH, LOW
from wsi_pipeline.explain.store import ConceptScores, read_concept_scores, write_concept_scores
from wsi_pipeline.explain.task import explain_task, slide_record
from wsi_pipeline.io.zarr_access import read_array
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.mil.bags import Bag, ZarrStore
from wsi_pipeline.mil.config import TaskConfig
from wsi_pipeline.mil.train import write_attention
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.config import TilingParams
from wsi_pipeline.tiling.stage import tile_slide

TASK = TaskConfig(name="dx", type="classification", label="diagnosis", classes=["benign", "tumour"])
HOSTILE = '<script>alert("x")</script> & necrosis'  # a concept name the page must escape
TISSUE = ["tumour", "stroma", "fat", HOSTILE]
LESION = ["atypia", "mitosis"]
N_SLIDES = 12  # 6 tumour patients (P10 with two slides) and 5 benign: enough for a significant rank test
CFG = ExplainConfig(top_k_tiles=4, heatmap_concepts=2, bootstrap=200, fdr=0.05)


def concept_scores(coords: np.ndarray, width: float, height: float, seed: int) -> tuple[ConceptScores, ...]:
    """Spatial concepts: 'tumour' rises left to right, 'stroma' top to bottom, 'fat' is flat (its softmax share
    still falls where tumour rises), the hostile one peaks at the centre; lesion (cosine only): 'atypia' rises left
    to right, 'mitosis' is noise, unrelated to where the model looks (the null concept)."""
    x, y = coords[:, 0] / width, coords[:, 1] / height
    logits = np.stack([4 * x, 4 * y, np.full_like(x, 1.0), 2 - 4 * np.abs(x - 0.5)], 1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    noise = np.random.default_rng(seed).normal(0.2, 0.02, len(x))
    cos = np.stack([0.2 + 0.1 * x, noise], 1)
    tissue = ConceptScores(TISSUE, (0.2 + 0.05 * logits).astype(np.float32), coords, probs.astype(np.float32))
    return tissue, ConceptScores(LESION, cos.astype(np.float32), coords)


def build_cohort(root: Path) -> Path:
    """RESULTS with tiles, attention, concept stores and fold predictions of task `dx`; returns RESULTS."""
    results = root / "results"
    layout = ResultsLayout(results)
    paths = [root / f"s{seed}.svs" for seed in (1, 2)]
    for seed, path in enumerate(paths, 1):
        write_synthetic_slide(path, width=3072, height=2048, mpp=0.5, seed=seed)
    rows = []
    for i in range(N_SLIDES):
        sid = f"slide_{i:02d}"
        side = tile_slide(paths[(i // 2) % 2], results, slide_id=sid, tiling=TilingParams(tile_px=128))
        assert side.status == "ok" and side.n_tiles > 20, side
        tiles = ZarrStore(layout.tiles_dir)  # the tile store has the coords the feature store would copy
        coords = tiles.coords(sid)
        for name, scores in zip(("tissue", "lesion"), concept_scores(coords, 3072, 2048, i), strict=True):
            perm = np.random.default_rng(i).permutation(len(coords))  # store rows in another order: matched by coords
            shuffled = ConceptScores(scores.concepts, scores.cosine[perm], coords[perm], None)
            if scores.probs is not None:
                shuffled.probs = scores.probs[perm]
            write_concept_scores(layout.concept_store("enc", name, sid), shuffled)
        label = 1 if i >= 10 else i % 2  # tumour slides: attention on the right (high 'tumour'); benign: left
        x = coords[:, 0] / 3072
        att = np.exp(6 * (x if label else 1 - x))
        patient = "P10" if i >= 10 else f"P{i:02d}"
        rows.append({"sid": sid, "patient": patient, "label": label, "att": att / att.sum(), "n": len(coords)})
    # fold predictions in stage 3's format; the two slides of P10 form one bag, their attention split back
    preds: dict[int, list[dict[str, object]]] = {0: [], 1: []}
    for bag_id in dict.fromkeys(r["patient"] for r in rows):
        members = [r for r in rows if r["patient"] == bag_id]
        index = int(bag_id[1:]) % 2
        bag = Bag(bag_id, [r["sid"] for r in members], lengths=[r["n"] for r in members], patient_id=bag_id)
        attention = np.concatenate([r["att"] for r in members]) / len(members)
        meta = {"task": "dx", "index": index, "seed": 0, "fold": index, "model": "abmil-gated"}
        write_attention(layout.attention_dir("dx"), ZarrStore(layout.tiles_dir), bag, attention, meta)
        label = members[0]["label"]
        p = 0.8 if bag_id != "P03" else 0.3  # one wrong prediction
        prob_tumour = p if label else 1 - p
        preds[index].append(
            {
                "bag_id": bag_id,
                "patient_id": bag_id,
                "slide_ids": ";".join(bag.slide_ids),
                "index": index,
                "seed": 0,
                "fold": index,
                "y_true": label,
                "label": TASK.classes[label],  # type: ignore[index]
                "prob_benign": 1 - prob_tumour,
                "prob_tumour": prob_tumour,
                "pred": "tumour" if prob_tumour > 0.5 else "benign",
            }
        )
    task_dir = layout.task_dir("dx")
    for index, table in preds.items():
        (task_dir / f"fold{index:02d}").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(table).to_csv(task_dir / f"fold{index:02d}" / "predictions.csv", index=False)
    (task_dir / "config.json").write_text(json.dumps({"classes": TASK.classes}))
    return results


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    results = build_cohort(tmp_path_factory.mktemp("explain"))
    captions = {"slide_01": ["a dense sheet of atypical cells", "<b>not bold</b>"]}
    summary = explain_task(results, TASK, "enc", ["tissue", "lesion"], CFG, captions=captions)
    return results, summary


def test_outputs_and_known_answers(explained: tuple[Path, dict]) -> None:
    results, summary = explained
    out = ResultsLayout(results).task_explain_dir("dx")
    assert summary["n_slides"] == N_SLIDES and Path(summary["page"]) == out / "index.html"
    table = pd.read_csv(out / "concepts.csv")
    assert len(table) == len(TISSUE) + len(LESION)  # one contrast: tumour vs benign
    tumour = table[(table["concept_set"] == "tissue") & (table["concept"] == "tumour")].iloc[0]
    assert tumour["contrast"] == "tumour vs benign" and tumour["n_a"] == 6 and tumour["n_b"] == 5  # P10 counted once
    assert tumour["significant"] and tumour["cliffs_delta"] == 1.0 and tumour["mean_a"] > 0 > tumour["mean_b"]
    mitosis = table[table["concept"] == "mitosis"].iloc[0]
    assert not mitosis["significant"] and mitosis["q"] > 0.05
    assert table.loc[table["concept"] == "atypia", "cliffs_delta"].iloc[0] == 1.0
    assert summary["n_significant"] == int(table["significant"].sum()) >= 1

    record = json.loads((out / "slides" / "slide_01.json").read_text())
    assert record["label"] == "tumour" and record["prediction"]["class"] == "tumour" and record["fold"]["index"] == 1
    assert record["concept_sets"]["tissue"]["top_concepts"][0]["concept"] == "tumour"
    # the weighted profile recomputed by hand from the stores on disk (rows matched by coords)
    layout = ResultsLayout(results)
    scores = read_concept_scores(layout.concept_store("enc", "tissue", "slide_01"))
    att = zarr.open_group(str(layout.attention_dir("dx") / "slide_01.zarr"), mode="r")
    a = read_array(att, "scores").astype(float)
    row_of = {tuple(c): j for j, c in enumerate(scores.coords.tolist())}
    assert scores.probs is not None
    s = scores.probs[[row_of[tuple(c)] for c in read_array(att, "coords").tolist()]].astype(float)
    np.testing.assert_allclose(record["concept_sets"]["tissue"]["weighted"], (a / a.sum()) @ s, atol=1e-6)
    tiles = record["top_tiles"]
    assert len(tiles) == CFG.top_k_tiles and tiles[0]["attention"] == pytest.approx((a / a.sum()).max())
    assert [t.get("caption") for t in tiles[:3]] == ["a dense sheet of atypical cells", "<b>not bold</b>", None]
    for rel in [*record["figures"].values(), *record["tile_images"]]:
        assert (out / rel).stat().st_size > 0, rel
    with Image.open(out / record["tile_images"][0]) as im:
        assert im.size == (128, 128)
    pooled = json.loads((out / "slides" / "slide_11.json").read_text())  # P10's second slide
    assert pooled["patient_id"] == "P10" and pooled["bag_id"] == "P10"


def test_page_is_escaped_and_links_resolve(explained: tuple[Path, dict]) -> None:
    results, _ = explained
    out = ResultsLayout(results).task_explain_dir("dx")
    page = (out / "index.html").read_text()
    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;b&gt;not bold&lt;/b&gt;" in page
    import re

    links = re.findall(r'src="([^"]+)"', page)
    assert len(links) == N_SLIDES * (2 + CFG.top_k_tiles)
    assert all((out / link).is_file() for link in links)


def test_rerun_replaces_outputs_and_drops_stale_ones(explained: tuple[Path, dict], tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(explained[0], results)
    out = ResultsLayout(results).task_explain_dir("dx")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.suffix in (".json", ".csv", ".html")}
    stale = out / "slides" / "gone.json"
    stale.write_text("{}")
    (out / "figures" / "gone__tissue.png").write_bytes(b"png")
    explain_task(results, TASK, "enc", ["tissue", "lesion"], CFG)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.suffix in (".json", ".csv", ".html")}
    assert not stale.exists() and not (out / "figures" / "gone__tissue.png").exists()
    assert after[Path("concepts.csv")] == before[Path("concepts.csv")]  # seeded bootstrap: the same table
    assert after[Path("slides/slide_00.json")] == before[Path("slides/slide_00.json")]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_misaligned_concept_store_is_one_line(explained: tuple[Path, dict], tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(explained[0], results)
    path = ResultsLayout(results).concept_store("enc", "lesion", "slide_03")
    scores = read_concept_scores(path)
    scores.coords[0] += 7  # a tile the attention never saw: the slide was re-tiled after training
    write_concept_scores(path, scores)
    with pytest.raises(FeatureError) as err:
        explain_task(results, TASK, "enc", ["tissue", "lesion"], CFG)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "1 attention tiles without concept scores" in msg
    assert "rerun `wsi-pipeline concepts`" in msg


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path) -> np.ndarray:
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH; install it with tests/install_chromium.sh")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}"]
    run = subprocess.run([*cmd, "--window-size=1200,2000", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"chromium wrote no screenshot (rc {run.returncode}): {run.stderr[-2000:]}"
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return (np.abs(img - np.array(rgb)) <= tol).all(axis=2)


def test_page_renders_in_chromium(explained: tuple[Path, dict], tmp_path: Path) -> None:
    out = ResultsLayout(explained[0]).task_explain_dir("dx")
    img = screenshot(out / "index.html", tmp_path / "page.png")
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 20 and (img.sum(2) < 200).mean() > 0.002  # not blank: text and pictures
    rows_with = lambda mask: np.flatnonzero(mask.sum(1) > 0)  # noqa: E731 - a local shorthand
    yellow = near(img, (255, 243, 176), 4)  # the significant rows of the cohort table
    bar = near(img, (217, 83, 79)) | near(img, (74, 123, 208))  # enrichment bars, red and blue
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    warm, cool = (r > g + 60) & (r > b + 60) & ~bar, (b > r + 60) & ~bar  # heatmap tiles over the thumbnail
    assert yellow.sum() > 1000 and bar.sum() > 500, (yellow.sum(), bar.sum())
    assert warm.sum() > 2000 and cool.sum() > 2000, (warm.sum(), cool.sum())
    # the table comes first, then the first slide's bars, then its heatmaps
    assert rows_with(yellow).max() < rows_with(bar).min() < rows_with(warm).min()


def test_survival_slide_on_the_page() -> None:
    task = TaskConfig(name="os", type="survival", time="t", event="e")
    row = pd.Series({"bag_id": "P1", "patient_id": "P1", "group": HIGH, "time": 12.5, "event": 1, "risk": 0.7})
    record = slide_record("s1", task, {"index": 0, "seed": 0, "fold": 0}, row, [])
    assert record["prediction"] == {"risk": 0.7, "risk_group": HIGH} and record["label"] is None
    table = pd.DataFrame(
        [{"concept_set": "tissue", "contrast": f"{HIGH} vs {LOW}", "concept": "necrosis", "n_a": 3, "n_b": 3}]
    ).assign(mean_a=0.1, mean_b=-0.1, cliffs_delta=1.0, ci_low=0.5, ci_high=1.0, p=0.05, q=0.05, significant=True)
    page = render_page("os", "survival", [record | {"n_tiles": 9}], table, {"encoder": "enc", "fdr": 0.05})
    assert "predicted risk 0.7 (high risk)" in page and "time 12.5" in page and "event 1" in page
    assert "<tr class='sig'>" in page and "high risk vs low risk" in page


def test_zero_shot_task_is_explained_from_its_tile_logits(explained: tuple[Path, dict], tmp_path: Path) -> None:
    """A zero-shot task writes predicted-class logits where trained tasks write attention (explain/zero_shot_io)."""
    results = tmp_path / "results"
    shutil.copytree(explained[0], results)
    layout = ResultsLayout(results)
    task = TaskConfig(
        name="zs", type="zero-shot", label="diagnosis", class_prompts={"benign": ["benign"], "tumour": ["tumour"]}
    )
    rows = []
    for i, sid in enumerate(["slide_00", "slide_01", "slide_02", "slide_03"]):
        n = len(ZarrStore(layout.tiles_dir).coords(sid))
        logits = np.linspace(-2.0, 30.0, n)[::-1] if i % 2 else np.linspace(-2.0, 30.0, n)
        meta = {"task": "zs", "index": 0, "seed": 0, "fold": 0, "model": "mi-zero", "score": "logit_scale * cosine"}
        write_attention(
            layout.attention_dir("zs"), ZarrStore(layout.tiles_dir), Bag(sid, [sid], lengths=[n]), logits, meta
        )
        label = ["benign", "tumour"][i % 2]
        rows.append({"bag_id": sid, "patient_id": sid, "slide_ids": sid, "index": 0, "seed": 0, "fold": 0})
        rows[-1] |= {"y_true": i % 2, "label": label, "prob_benign": 0.4, "prob_tumour": 0.6, "pred": "tumour"}
    (layout.task_dir("zs") / "fold00").mkdir(parents=True)
    pd.DataFrame(rows).assign(pooling="top10").to_csv(layout.task_dir("zs") / "fold00" / "predictions.csv", index=False)
    (layout.task_dir("zs") / "config.json").write_text(json.dumps({"classes": ["benign", "tumour"]}))
    summary = explain_task(results, task, "enc", ["tissue"], CFG.model_copy(update={"bootstrap": 0}))
    assert summary["n_slides"] == 4
    out = layout.task_explain_dir("zs")
    record = json.loads((out / "slides" / "slide_01.json").read_text())
    assert record["attention"].startswith("softmax") and record["prediction"]["class"] == "tumour"
    n = record["n_tiles"]
    top = np.exp(-np.arange(n) * 32.0 / (n - 1))  # softmax of the evenly spaced logits, highest first
    assert record["top_tiles"][0]["attention"] == pytest.approx(1 / top.sum())
    assert "zero-shot tile logits" in (out / "index.html").read_text()
