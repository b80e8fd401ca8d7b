"""Captioning top tiles with a real (tiny, random, seeded) VisionEncoderDecoder on tiles of a real slide: local
folder and Hugging Face cache, offline; deterministic captions; the one-line errors for unusable model folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_vision_encoder_decoder, no_network, put_in_hub_cache  # noqa: F401

from wsi_pipeline.errors import ConfigError, EncoderError, SlideError
from wsi_pipeline.explain.captions import Captioner, build_captioner, caption_slide_tiles
from wsi_pipeline.explain.config import CaptionerConfig
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.slide.reader import open_slide
from wsi_pipeline.tiling.geometry import geometry_from_attrs, read_tile
from wsi_pipeline.tiling.stage import tile_slide
from wsi_pipeline.tiling.table import read_tile_table

pytestmark = pytest.mark.usefixtures("no_network")

CORPUS = [
    "tumour cells with nuclear atypia and frequent mitoses",
    "normal stroma with scattered lymphocytes",
    "adipose tissue and small blood vessels",
    "glands lined by columnar epithelium",
]
EOT = "<|endoftext|>"
N_TILES = 5


def make_tiny_captioner(root: Path, seed: int = 0) -> Path:
    """A GPT-2 BPE tokenizer (trained on a few sentences), a ViT image encoder and a GPT-2 decoder sized to it;
    no decoder_start/pad ids saved, as many GPT-2 captioners ship."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        GPT2Config,
        GPT2TokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=[EOT], show_progress=False)
    bpe.save_model(str(d))  # vocab.json + merges.txt, as GPT-2 ships them
    tokenizer = GPT2TokenizerFast(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    tokenizer.save_pretrained(str(d))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    enc = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    # Untied output head: a random tied GPT-2 echoes its input token, i.e. would end every caption at once.
    dec = GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=64,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=False,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    model.save_pretrained(str(d), safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        str(d)
    )
    return d


def copy_without(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*names))
    return dst


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_captioner(tmp_path_factory.mktemp("captioner") / "model")


@pytest.fixture(scope="module")
def cmu_tiles(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The CMU slide tiled by stage 1: (tile store, the first few tile coordinates)."""
    results = tmp_path_factory.mktemp("results")
    side = tile_slide(cmu_slide, results, slide_id="cmu")
    assert side["status"] == "ok", side.get("reason")
    store = ResultsLayout(results).tile_store("cmu")
    coords = read_tile_table(store).coords
    assert len(coords) >= N_TILES
    return store, coords[:N_TILES]


@pytest.fixture(scope="module")
def captioner(tiny_dir: Path) -> Captioner:
    return build_captioner(CaptionerConfig(path=str(tiny_dir), max_new_tokens=12), batch_size=2)


def test_captions_real_tiles_deterministically(captioner: Captioner, cmu_tiles: tuple[Path, np.ndarray]) -> None:
    store, coords = cmu_tiles
    first = caption_slide_tiles(captioner, store, coords)
    assert len(first) == N_TILES and all(isinstance(c, str) for c in first)
    assert len(set(first)) > 1  # a random decoder still writes something, and it depends on the tile
    assert all("\n" not in c and EOT not in c for c in first)  # one line each, special tokens stripped
    assert caption_slide_tiles(captioner, store, coords) == first
    # Batches of 2 (3 generate calls) equal one tile at a time: batching never mixes tiles up.
    attrs = read_tile_table(store).attrs
    with open_slide(attrs["slide_path"]) as slide:
        tiles = [read_tile(slide, (int(x), int(y)), geometry_from_attrs(attrs)) for x, y in coords]
    assert [captioner.caption([t])[0] for t in tiles] == first
    assert captioner.caption([]) == [] and caption_slide_tiles(captioner, store, coords[:0]) == []


def test_provenance_names_the_weights_and_the_filled_in_tokens(captioner: Captioner, tiny_dir: Path) -> None:
    prov = captioner.provenance()
    sha = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert prov["weight_files"] == {"model.safetensors": sha} and prov["weights_sha256"]
    assert prov["path"] == str(tiny_dir.resolve()) and prov["revision"] is None
    eot = captioner.tokenizer.convert_tokens_to_ids(EOT)
    # nothing saved on the VED config: the decoder's bos starts a caption, its eos pads
    assert prov["decoder_start_token_id"] == eot and prov["pad_token_id"] == eot and prov["eos_token_id"] == eot
    assert prov["image_processor_source"] == "preprocessor_config.json"
    assert prov["encoder_type"] == "vit" and prov["decoder_type"] == "gpt2" and prov["decoding"] == "greedy"
    assert {"transformers", "torch", "wsi_pipeline"} <= set(prov["library_versions"])
    json.dumps(prov)  # goes into a JSON sidecar as is


def test_beam_search_and_the_clip_fallback_without_a_processor_config(
    tiny_dir: Path, tmp_path: Path, cmu_tiles: tuple[Path, np.ndarray]
) -> None:
    folder = copy_without(tiny_dir, tmp_path / "noproc", ("preprocessor_config.json",))
    cap = build_captioner(CaptionerConfig(path=str(folder), max_new_tokens=6, num_beams=3))
    source = cap.provenance()["image_processor_source"]
    assert "CLIP mean/std" in source and "32" in source and cap.provenance()["decoding"] == "beam search"
    out = caption_slide_tiles(cap, *cmu_tiles)
    assert len(out) == N_TILES and out == caption_slide_tiles(cap, *cmu_tiles)


def test_same_captions_from_the_hub_cache_offline(
    tiny_dir: Path,
    captioner: Captioner,
    tmp_path: Path,
    cmu_tiles: tuple[Path, np.ndarray],
    no_network: list,  # noqa: F811
) -> None:
    rev = "0123456789abcdef0123456789abcdef01234567"
    put_in_hub_cache(tiny_dir, tmp_path / "hub", "org/medcaption-tiny", rev)
    cfg = CaptionerConfig(
        model_id="org/medcaption-tiny", revision=rev, cache_dir=str(tmp_path / "hub"), max_new_tokens=12
    )
    cap = build_captioner(cfg)
    assert caption_slide_tiles(cap, *cmu_tiles) == caption_slide_tiles(captioner, *cmu_tiles)
    prov = cap.provenance()
    assert prov["model_id"] == "org/medcaption-tiny" and prov["revision"] == rev
    assert prov["weights_sha256"] == captioner.provenance()["weights_sha256"] and no_network == []


def test_clip_gpt2_reference_layout_with_a_wordpiece_tokenizer(
    tmp_path: Path, cmu_tiles: tuple[Path, np.ndarray]
) -> None:
    # The reference captioners' shape (CLIP vision encoder + GPT-2 decoder, CLIP processor), tokenised by vocab.txt.
    from transformers import BertTokenizer

    model = make_tiny_vision_encoder_decoder(tmp_path / "ved")  # decoder vocab 100, bos 0, eos 1
    words = ["[PAD]", "[SEP]", "[UNK]", "[CLS]", "[MASK]", *sorted({w for s in CORPUS for w in s.split()})]
    words += [f"w{i}" for i in range(100 - len(words))]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(str(model))
    cap = build_captioner(CaptionerConfig(path=str(model), max_new_tokens=8))
    out = caption_slide_tiles(cap, *cmu_tiles)
    assert len(out) == N_TILES and all(isinstance(c, str) and "[PAD]" not in c for c in out)
    assert out == caption_slide_tiles(cap, *cmu_tiles)
    prov = cap.provenance()
    assert prov["encoder_type"] == "clip_vision_model" and prov["tokenizer"] == "BertTokenizer"
    assert (prov["decoder_start_token_id"], prov["eos_token_id"], prov["pad_token_id"]) == (0, 1, 0)


def one_line_error(cfg: CaptionerConfig, *needles: str) -> str:
    with pytest.raises(EncoderError) as info:
        build_captioner(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("explain.captioner"), msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_folder_and_uncached_repo(tmp_path: Path) -> None:
    one_line_error(CaptionerConfig(path=str(tmp_path / "nowhere")), str(tmp_path / "nowhere"), "does not exist")
    cfg = CaptionerConfig(model_id="org/not-cached", revision="abc", cache_dir=str(tmp_path / "hub"))
    one_line_error(cfg, "org/not-cached@abc", "not in", "hf download org/not-cached --revision abc")


def test_missing_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
    folder = copy_without(tiny_dir, tmp_path / "notok", tok_files)
    one_line_error(CaptionerConfig(path=str(folder)), str(folder), "no tokenizer files", "save_pretrained")


def test_not_a_vision_encoder_decoder(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(
        str(tmp_path / "gpt2")
    )
    one_line_error(CaptionerConfig(path=str(tmp_path / "gpt2")), "gpt2 model, not a VisionEncoderDecoder")
    (tmp_path / "empty").mkdir()
    one_line_error(CaptionerConfig(path=str(tmp_path / "empty")), "no weight files")


def test_remote_code_needs_opt_in(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_without(tiny_dir, tmp_path / "remote", ())
    config = json.loads((folder / "config.json").read_text())
    config["decoder"]["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomDecoder"}
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(CaptionerConfig(path=str(folder)), "modeling_custom.py", "trust_remote_code: true")


def test_captions_longer_than_the_decoder_allows(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="set max_new_tokens to at most 63"):
        build_captioner(CaptionerConfig(path=str(tiny_dir), max_new_tokens=64))


def test_missing_tile_store_is_one_line(captioner: Captioner, tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="run `wsi-pipeline tile`"):
        caption_slide_tiles(captioner, tmp_path / "tiles" / "gone.zarr", np.zeros((1, 2), dtype=np.int64))


def test_a_task_captions_each_slide_s_top_attention_tiles_in_rank_order(
    captioner: Captioner, tiny_dir: Path, cmu_tiles: tuple[Path, np.ndarray]
) -> None:
    """`explain.task.top_tile_captions`: what `wsi-pipeline explain` hands the page, the top tiles by attention."""
    import zarr

    from wsi_pipeline.explain.config import ExplainConfig
    from wsi_pipeline.explain.task import top_tile_captions

    store, coords = cmu_tiles
    results = store.parent.parent
    att = zarr.open_group(str(ResultsLayout(results).attention_dir("t") / "cmu.zarr"), mode="w")
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.3][: len(coords)], np.float32)
    att.create_array("scores", data=scores)
    att.create_array("coords", data=coords.astype(np.int64))
    cfg = ExplainConfig.model_validate(
        {"captioner": {"path": str(tiny_dir), "max_new_tokens": 12, "tiles_per_slide": 2}}
    )
    got = top_tile_captions(results, "t", cfg)
    order = np.argsort(-scores, kind="stable")[:2]  # highest attention first, as the page lists top tiles
    assert got == {"cmu": caption_slide_tiles(captioner, store, coords[order])}
    assert top_tile_captions(results, "t", ExplainConfig()) == {}  # no captioner: nothing to caption
