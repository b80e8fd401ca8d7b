"""The committed demo dual encoder (workflows/demo/demo_clip, trained by workflows/demo/train_demo_clip.py) loads
through the ConceptCLIP path and knows its textures: on freshly generated slides, tiled and encoded by the real
stages, each tile's cosine with its texture's concept in workflows/concepts/tissue.yaml singles out that texture,
and the tumour concept tells tumour slides from tumour-free ones zero-shot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
import zarr
from sklearn.metrics import roc_auc_score

from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encoders import EncoderConfig, build_encoder
from wsi_pipeline.encoders.text import build_concept_embeddings, build_text_encoder
from wsi_pipeline.errors import EncoderError
from wsi_pipeline.explain.concepts import load_concept_set
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.synthetic import (
    TEXTURE_CONCEPTS,
    TEXTURES,
    TISSUE,
    Region,
    SyntheticSpec,
    write_demo_cohort,
    write_synthetic_slide,
)
from wsi_pipeline.tiling.stage import tile_slide
from wsi_pipeline.tiling.table import read_tile_table

DEMO_CLIP = Path(__file__).resolve().parents[1] / "workflows" / "demo" / "demo_clip"
CFG = EncoderConfig(name="conceptclip", path=str(DEMO_CLIP), trust_remote_code=True)
W, H = 2048, 1536
# Four regions per slide (2 x 2 grid); seeds 7_000_000+ are used neither by the training script nor the demo cohort.
# Adipose, the palest texture, shares slides with other pale-to-mid textures, as in the demo cohort.
SLIDES = [
    (("tumour", "stroma", "lymphocytes", "necrosis"), "he"),
    (("adipose", "mucin", "stroma", "necrosis"), "he_light"),
    (("mucin", "tumour", "stroma", "lymphocytes"), "he_dark"),
    (("stroma", "adipose", "necrosis", "mucin"), "he"),
    (("necrosis", "lymphocytes", "tumour", "mucin"), "he_light"),
    (("lymphocytes", "stroma", "mucin", "adipose"), "he_dark"),
]


def _regions(seed: int) -> tuple[Region, ...]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(4):
        cx, cy = (i % 2) * W / 2, (i // 2) * H / 2
        kind = "ellipse" if rng.uniform() < 0.5 else "rectangle"
        m = rng.uniform(40, 90, 4)
        out.append(Region(kind, cx + m[0], cy + m[1], cx + W / 2 - m[2], cy + H / 2 - m[3]))
    return tuple(out)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[SyntheticSpec, np.ndarray, np.ndarray]]:
    """(spec, level-0 tile coords, features) per slide, through tile_slide and encode_slide."""
    root = tmp_path_factory.mktemp("demo_clip")
    results = root / "results"
    encoder = build_encoder(CFG)
    out = []
    for i, (textures, stain) in enumerate(SLIDES):
        seed = 7_000_000 + i
        spec = write_synthetic_slide(
            root / f"s{i}.svs",
            width=W,
            height=H,
            mpp=0.5,
            seed=seed,
            regions=_regions(seed),
            textures=textures,
            stain=stain,
            jpeg_quality=60,
        )
        assert tile_slide(spec.path, results, slide_id=f"s{i}")["status"] == "ok"
        side = encode_slide(results, f"s{i}", CFG, encoder=encoder, device="cpu", dtype="float32")
        assert side["status"] == "ok", side
        g = zarr.open_group(str(ResultsLayout(results).feature_store("conceptclip", f"s{i}")), mode="r")
        coords = read_tile_table(results / "tiles" / f"s{i}.zarr").coords
        np.testing.assert_array_equal(np.asarray(g["coords"][...]), coords)
        out.append((spec, coords, np.asarray(g["features"][...])))
    return out


@pytest.fixture(scope="module")
def concepts() -> tuple[list[str], torch.Tensor]:
    cs = load_concept_set("tissue")
    return cs.concept_names, build_concept_embeddings(build_text_encoder(CFG), cs.prompt_texts())


def test_checkpoint_loads_through_the_conceptclip_path() -> None:
    enc = build_encoder(CFG)
    assert enc.embed_dim == 64 and enc.preprocessing.size == 64 and enc.preprocessing.mean == (0.5,) * 3
    tiles = torch.randint(0, 256, (3, 256, 256, 3), dtype=torch.uint8)
    assert enc.encode_uint8(tiles).shape == (3, 64)
    prov = enc.provenance()
    assert prov["trust_remote_code"] is True and prov["model_class"] == "DemoClipModel"
    text = build_text_encoder(CFG)
    assert (text.embed_dim, text.context_length) == (64, 77) and text.logit_scale > 1
    emb = text.encode_text(["an H&E image of tumor epithelium.", "fat", "sheets of small round cells"])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert sum(f.stat().st_size for f in DEMO_CLIP.iterdir()) < 2_000_000


def test_remote_code_needs_consent() -> None:
    with pytest.raises(EncoderError, match="trust_remote_code: true"):
        build_encoder(EncoderConfig(name="conceptclip", path=str(DEMO_CLIP)))
    with pytest.raises(EncoderError, match="trust_remote_code: true"):
        build_text_encoder(EncoderConfig(name="conceptclip", path=str(DEMO_CLIP)))


def _tile_labels(spec: SyntheticSpec, coords: np.ndarray, size: float = 256) -> np.ndarray:
    """Each tile's texture (the one covering most of it; regions do not touch, so there is one at most)."""
    out = []
    for x, y in coords:
        frac = spec.texture_fraction(x, y, x + size, y + size)
        out.append(max((k for k in frac if k), key=frac.__getitem__, default=""))
    return np.asarray(out)


def test_each_texture_scores_highest_on_its_concept(encoded, concepts) -> None:
    names, emb = concepts
    feats = np.concatenate([f for _, _, f in encoded])
    labels = np.concatenate([_tile_labels(spec, c) for spec, c, _ in encoded])
    cos = torch.nn.functional.normalize(torch.from_numpy(feats), dim=1) @ emb.T
    aucs = {}
    for texture in TEXTURES:
        assert (labels == texture).sum() >= 8, (texture, (labels == texture).sum())
        aucs[texture] = roc_auc_score(labels == texture, cos[:, names.index(TEXTURE_CONCEPTS[texture])].numpy())
    assert min(aucs.values()) >= 0.9, aucs
    # zero-shot over the six concepts: most tiles get their own texture's concept
    six = [names.index(TEXTURE_CONCEPTS[t]) for t in TEXTURES]
    keep = labels != ""
    predicted = np.asarray(TEXTURES)[cos[keep][:, six].argmax(1).numpy()]
    assert (predicted == labels[keep]).mean() > 0.8


def test_tumour_concept_tells_tumour_slides_zero_shot(encoded, concepts) -> None:
    names, emb = concepts
    tumour = emb[names.index(TEXTURE_CONCEPTS["tumour"])]
    scores, has_tumour = [], []
    for spec, _, feats in encoded:
        cos = torch.nn.functional.normalize(torch.from_numpy(feats), dim=1) @ tumour
        scores.append(float(cos.topk(min(5, len(cos))).values.mean()))
        has_tumour.append("tumour" in spec.textures)
    assert 0 < sum(has_tumour) < len(has_tumour)
    assert roc_auc_score(has_tumour, scores) >= 0.9, list(zip(has_tumour, scores, strict=True))


def test_textures_are_recorded_drawn_where_recorded_and_validated(tmp_path: Path) -> None:
    assert set(TEXTURE_CONCEPTS) == set(TEXTURES)
    assert set(TEXTURE_CONCEPTS.values()) <= set(load_concept_set("tissue").concept_names)
    regions = tuple(
        Region("rectangle", 8 + 336 * (i % 3), 8 + 336 * (i // 3), 328 + 336 * (i % 3), 328 + 336 * (i // 3))
        for i in range(6)
    )
    spec = write_synthetic_slide(
        tmp_path / "t.svs", width=1024, height=680, mpp=0.5, regions=regions, textures=TEXTURES, seed=5
    )
    assert spec.textures == TEXTURES
    centres = [((r.x0 + r.x1) / 2, (r.y0 + r.y1) / 2) for r in regions]
    assert [str(spec.texture_at(np.array([x]), np.array([y]))[0, 0]) for x, y in centres] == list(TEXTURES)
    assert spec.texture_at(np.array([2.0]), np.array([2.0]))[0, 0] == ""
    frac = spec.texture_fraction(0, 0, 336, 336)
    assert set(frac) == {"", "tumour"} and sum(frac.values()) == pytest.approx(1) and frac["tumour"] > 0.85
    # level 0 is drawn as recorded: adipose palest, lymphocytes and tumour darkest, mucin the bluest
    s = openslide.OpenSlide(spec.path)
    rgb = {
        t: np.asarray(s.read_region((int(r.x0) + 32, int(r.y0) + 32), 0, (256, 256)).convert("RGB"), float)
        for t, r in zip(TEXTURES, regions, strict=True)
    }
    mean = {t: a.mean() for t, a in rgb.items()}
    assert max(mean, key=mean.__getitem__) == "adipose"
    assert sorted(mean, key=mean.__getitem__)[:2] in (["tumour", "lymphocytes"], ["lymphocytes", "tumour"])
    blue = {t: (a[..., 2] - a[..., 0]).mean() for t, a in rgb.items()}
    assert max(blue, key=blue.__getitem__) == "mucin"
    plain = write_synthetic_slide(tmp_path / "p.svs", width=512, height=512, mpp=0.5, seed=5)
    assert plain.textures == () and set(plain.region_textures) == {TISSUE}
    with pytest.raises(ValueError, match="unknown textures"):
        write_synthetic_slide(tmp_path / "x.svs", width=512, height=512, textures=("tumour", "bone", "fat"))
    with pytest.raises(ValueError, match="one texture per region"):
        write_synthetic_slide(tmp_path / "x.svs", width=512, height=512, textures=("tumour",))


def test_texture_demo_cohort_puts_tumour_in_class_1_only(tmp_path: Path) -> None:
    import pandas as pd

    sheet = write_demo_cohort(tmp_path, n_slides=6, seed=3, width=768, height=576, classes="texture")
    truth = pd.read_csv(tmp_path / "textures.csv")
    assert set(truth.slide_id) == set(sheet.slide_id) and (truth.groupby("slide_id").size() == 3).all()
    has_tumour = truth.groupby("slide_id").texture.apply(lambda t: "tumour" in set(t))
    assert (sheet.set_index("slide_id").label == has_tumour.astype(int)).all()
