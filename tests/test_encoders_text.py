"""Text towers (stage 4, explain): tiny real open_clip and ConceptCLIP-like models, random weights, offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_OPEN_CLIP_PREPROCESS, no_network, put_in_hub_cache  # noqa: F401

from wsi_pipeline.encoders import EncoderConfig, build_encoder
from wsi_pipeline.encoders.text import (
    TextEncoder,
    available_text_encoders,
    build_concept_embeddings,
    build_text_encoder,
)
from wsi_pipeline.errors import ConfigError, EncoderError

pytestmark = pytest.mark.usefixtures("no_network")

# The image side's tiny config, with the real CLIP BPE vocabulary size so open_clip's tokenizer fits it.
TINY_TEXT_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

CLASSNAMES = ["tumour", "stroma", "necrosis", "lymphocytes"]
TEMPLATES = ["an H&E image of {}.", "a histology tile showing {}.", "{}"]


def make_tiny_text_open_clip(root: Path, seed: int = 0) -> Path:
    """An open_clip hf-hub style directory, as the image side loads: open_clip_config.json + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_TEXT_CLIP_CFG)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    cfg = {"model_cfg": TINY_TEXT_CLIP_CFG, "preprocess_cfg": TINY_OPEN_CLIP_PREPROCESS}
    (d / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return d


@pytest.fixture(scope="module")
def tiny_oc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_open_clip(tmp_path_factory.mktemp("oc") / "model")


@pytest.fixture(scope="module")
def tiny_oc_text(tiny_oc: Path) -> TextEncoder:
    return build_text_encoder(EncoderConfig(name="open_clip", path=str(tiny_oc)))


def _reference(model_dir: Path):
    import open_clip

    model = open_clip.create_model(f"local-dir:{model_dir}", pretrained_text=False).eval()
    return model, open_clip.get_tokenizer(f"local-dir:{model_dir}")


def test_open_clip_text_embeddings(tiny_oc: Path, tiny_oc_text: TextEncoder) -> None:
    enc = tiny_oc_text
    assert (enc.embed_dim, enc.context_length) == (24, 16)
    assert enc.logit_scale == pytest.approx(float(torch.tensor(2.5).exp()))
    emb = enc.encode_text(["tumour", "stroma", "an H&E image of necrosis"])
    assert emb.shape == (3, 24) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert not torch.allclose(emb[0], emb[1])
    model, tokenizer = _reference(tiny_oc)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["tumour", "stroma", "an H&E image of necrosis"]), normalize=True)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
    assert enc.encode_text([]).shape == (0, 24)


def test_concept_embeddings_match_open_clip_zero_shot_classifier(tiny_oc: Path, tiny_oc_text: TextEncoder) -> None:
    import open_clip

    model, tokenizer = _reference(tiny_oc)
    expected = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)  # (D, C)
    prompts = [[t.format(c) for t in TEMPLATES] for c in CLASSNAMES]
    concepts = build_concept_embeddings(tiny_oc_text, prompts)
    assert concepts.shape == (len(CLASSNAMES), 24)
    torch.testing.assert_close(concepts, expected.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(concepts.norm(dim=1), torch.ones(len(CLASSNAMES)))
    # Concepts may have different numbers of prompts; one prompt is just its own embedding.
    uneven = build_concept_embeddings(tiny_oc_text, [["tumour"], ["stroma", "a tile of stroma"]])
    torch.testing.assert_close(uneven[0], tiny_oc_text.encode_text(["tumour"])[0], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="no prompts"):
        build_concept_embeddings(tiny_oc_text, [["tumour"], []])


def test_truncation_warning_lists_long_prompts(tiny_oc_text: TextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = "an H&E image of " + " ".join(["densely packed tumour cells"] * 10)
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.encoders.text"):
        tiny_oc_text.encode_text(["tumour", "a tile of stroma"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.encoders.text"):
        emb = tiny_oc_text.encode_text(["tumour", long_prompt])
    assert emb.shape == (2, 24)
    [record] = caplog.records
    msg = record.getMessage()
    assert "1 of 2 prompts" in msg and "16 tokens" in msg and repr(long_prompt) in msg and "'tumour'" not in msg
    # 14 BPE tokens + start/end is exactly the context: not truncated.
    fits = " ".join(["tumour"] * 14)
    assert len(tiny_oc_text.truncated_prompts([fits])) == 0
    assert len(tiny_oc_text.truncated_prompts([fits + " tumour"])) == 1


def test_provenance_and_same_weights_as_image_side(tiny_oc: Path, tiny_oc_text: TextEncoder) -> None:
    prov = tiny_oc_text.provenance()
    image = build_encoder(EncoderConfig(name="open_clip", path=str(tiny_oc))).provenance()
    assert prov["encoder"] == "open_clip" and prov["tower"] == "text" and prov["path"] == str(tiny_oc)
    assert prov["weights_sha256"] == image["weights_sha256"] is not None
    assert prov["weight_files"] == image["weight_files"] and prov["tokenizer"] == "SimpleTokenizer"
    json.dumps(prov)


def test_checkpoint_file_with_architecture(tiny_oc: Path, tiny_oc_text: TextEncoder, tmp_path: Path) -> None:
    import open_clip

    (tmp_path / "tiny-text-clip-test.json").write_text(json.dumps(TINY_TEXT_CLIP_CFG))
    open_clip.add_model_config(tmp_path)
    enc = build_text_encoder(
        EncoderConfig(
            name="open_clip", model_id="tiny-text-clip-test", path=str(tiny_oc / "open_clip_model.safetensors")
        )
    )
    torch.testing.assert_close(enc.encode_text(CLASSNAMES), tiny_oc_text.encode_text(CLASSNAMES), rtol=0, atol=0)


def test_whylesionclip_text_from_hub_cache(tiny_oc: Path, tmp_path: Path, no_network: list) -> None:  # noqa: F811
    rev = "2" * 40
    put_in_hub_cache(tiny_oc, tmp_path / "hub", "yyupenn/whylesionclip", rev)
    enc = build_text_encoder(EncoderConfig(name="whylesionclip", cache_dir=str(tmp_path / "hub"), revision=rev))
    prov = enc.provenance()
    assert prov["model_id"] == "hf-hub:yyupenn/whylesionclip" and prov["revision"] == rev
    assert enc.encode_text(["tumour"]).shape == (1, 24)
    with pytest.raises(EncoderError, match="hf download yyupenn/whylesionclip"):
        build_text_encoder(EncoderConfig(name="whylesionclip", cache_dir=str(tmp_path / "empty")))
    assert no_network == []


@pytest.mark.parametrize("name", ["stain-texture", "timm", "vision-encoder-decoder", "no-such-encoder"])
def test_encoders_without_text_tower(name: str) -> None:
    with pytest.raises(EncoderError) as err:
        build_text_encoder(EncoderConfig(name=name))
    msg = str(err.value)
    assert "\n" not in msg and f"{name!r} has no text tower" in msg
    assert "conceptclip, conceptclip-arch-random, open_clip, whylesionclip" in msg
    assert available_text_encoders() == ["conceptclip", "conceptclip-arch-random", "open_clip", "whylesionclip"]


# --- a ConceptCLIP-like checkpoint with a text tower: remote code, BertTokenizer (vocab.txt), logit_scale ---

CC_CONFIG_CODE = """
from transformers import PretrainedConfig


class TinyTextConceptConfig(PretrainedConfig):
    model_type = "tinytextconcept"

    def __init__(self, vocab_size=40, width=32, proj_dim=16, **kwargs):
        self.vocab_size = vocab_size
        self.width = width
        self.proj_dim = proj_dim
        super().__init__(**kwargs)
"""

CC_MODELING_CODE = '''
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, PreTrainedModel

from .configuration_tinytextconcept import TinyTextConceptConfig


class TinyTextConceptModel(PreTrainedModel):
    """ConceptCLIP's text contract in miniature: a BERT text tower, CLS pooled and projected;
    encode_text(input_ids, attention_mask=None, normalize=False) -> (pooled (B, proj_dim), tokens)."""

    config_class = TinyTextConceptConfig
    base_model_prefix = "tinytextconcept"

    def __init__(self, config):
        super().__init__(config)
        bert = BertConfig(vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=80)
        self.text = BertModel(bert, add_pooling_layer=False)
        self.text_proj = torch.nn.Linear(config.width, config.proj_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(3.0))
        self.post_init()

    def _init_weights(self, module):
        pass

    def encode_text(self, input_ids, attention_mask=None, normalize=False):
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self.text_proj(tokens[:, 0])
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens
'''

CC_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "h", "&", "e", "image", "of", "tumour", "stroma"]
CC_VOCAB += ["necrosis", "a", "tile", "showing", "lymphocytes", ".", "cells", "dense"]


def make_tiny_text_conceptclip(root: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModel

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    (d / "configuration_tinytextconcept.py").write_text(CC_CONFIG_CODE)
    (d / "modeling_tinytextconcept.py").write_text(CC_MODELING_CODE)
    auto_map = {
        "AutoConfig": "configuration_tinytextconcept.TinyTextConceptConfig",
        "AutoModel": "modeling_tinytextconcept.TinyTextConceptModel",
    }
    cfg = {"model_type": "tinytextconcept", "auto_map": auto_map, "vocab_size": len(CC_VOCAB), "width": 32}
    (d / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(str(d), safe_serialization=True)
    saved = json.loads((d / "config.json").read_text())
    saved["auto_map"] = auto_map
    (d / "config.json").write_text(json.dumps(saved))
    (d / "vocab.txt").write_text("\n".join(CC_VOCAB) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_cc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_conceptclip(tmp_path_factory.mktemp("cc") / "model")


def test_conceptclip_text_tower(tiny_cc: Path, caplog: pytest.LogCaptureFixture, no_network: list) -> None:  # noqa: F811
    from transformers import AutoModel, BertTokenizer

    with pytest.raises(EncoderError, match="trust_remote_code: true"):
        build_text_encoder(EncoderConfig(name="conceptclip", path=str(tiny_cc)))
    enc = build_text_encoder(EncoderConfig(name="conceptclip", path=str(tiny_cc), trust_remote_code=True))
    assert (enc.embed_dim, enc.context_length) == (16, 77)
    assert enc.logit_scale == pytest.approx(float(torch.tensor(3.0).exp()))
    prompts = ["an H&E image of tumour.", "a tile showing stroma", "necrosis"]
    emb = enc.encode_text(prompts)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # The checkpoint's own encode_text on max-length-padded BertTokenizer ids, normalised.
    model = AutoModel.from_pretrained(str(tiny_cc), trust_remote_code=True, local_files_only=True).eval()
    tok = BertTokenizer.from_pretrained(str(tiny_cc))
    batch = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert batch["input_ids"].shape == (3, 77)
    with torch.no_grad():
        expected = model.encode_text(batch["input_ids"], attention_mask=batch["attention_mask"], normalize=True)[0]
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
    # Padding to the max length does not change a prompt's embedding (the mask hides the padding).
    torch.testing.assert_close(enc.encode_text(prompts[:1]), emb[:1], rtol=0, atol=1e-6)
    long_prompt = " ".join(["dense tumour cells"] * 30)
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.encoders.text"):
        enc.encode_text([long_prompt])
    assert "77 tokens" in caplog.text and "92 tokens" in caplog.text
    prov = enc.provenance()
    assert prov["trust_remote_code"] is True and prov["tokenizer"] == "BertTokenizer"
    assert set(prov["weight_files"]) == {"model.safetensors"} and prov["weights_sha256"]
    assert no_network == []


def test_conceptclip_text_needs_vocab_and_pinned_cache(tiny_cc: Path, tmp_path: Path) -> None:
    from wsi_pipeline.encoders import CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION

    snap = put_in_hub_cache(tiny_cc, tmp_path / "hub", CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION)
    enc = build_text_encoder(EncoderConfig(name="conceptclip", cache_dir=str(tmp_path / "hub"), trust_remote_code=True))
    prov = enc.provenance()
    assert prov["model_id"] == CONCEPTCLIP_REPO and prov["revision"] == CONCEPTCLIP_REVISION
    (snap / "vocab.txt").unlink()
    with pytest.raises(EncoderError, match="no vocab.txt"):
        build_text_encoder(EncoderConfig(name="conceptclip", path=str(snap), trust_remote_code=True))
    with pytest.raises(EncoderError, match="hf download"):
        build_text_encoder(EncoderConfig(name="conceptclip", cache_dir=str(tmp_path / "empty"), trust_remote_code=True))
