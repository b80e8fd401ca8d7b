"""`conceptclip-arch-random` text tower: ConceptCLIP's text architecture (PubMedBERT-base + projection to 1152),
random seeded weights, a generated BERT vocabulary; real transformers model on the CPU, offline."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import no_network  # noqa: F401

from wsi_pipeline.encoders import EncoderConfig
from wsi_pipeline.encoders.text import TorchTextEncoder, build_concept_embeddings, build_text_encoder
from wsi_pipeline.encoders.text_random import PUBMEDBERT_BASE, SPECIAL_IDS, build_tokenizer, generated_vocab
from wsi_pipeline.explain.concepts import load_concept_set

pytestmark = pytest.mark.usefixtures("no_network")

NAME = "conceptclip-arch-random"
PROMPTS = ["an H&E image of tumour.", "a histology tile showing stroma.", "necrosis"]


@pytest.fixture(scope="module")
def random_text() -> TorchTextEncoder:
    enc = build_text_encoder(EncoderConfig(name=NAME), "cpu")
    assert isinstance(enc, TorchTextEncoder)
    return enc


def test_generated_vocab_has_bert_special_ids() -> None:
    vocab = generated_vocab()
    assert len(vocab) == len(set(vocab)) == PUBMEDBERT_BASE["vocab_size"] == 30522
    assert all(vocab[i] == tok for tok, i in SPECIAL_IDS.items())
    assert vocab[1] == "[unused0]" and any(t.startswith("##") for t in vocab)


def test_shapes_norms_and_tokens(random_text: TorchTextEncoder) -> None:
    enc = random_text
    assert (enc.embed_dim, enc.context_length) == (1152, 77)
    assert enc.logit_scale == pytest.approx(1 / 0.07) and enc.logit_bias is None
    emb = enc.encode_text(PROMPTS)
    assert emb.shape == (3, 1152) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert not torch.allclose(emb[0], emb[1])
    assert enc.encode_text([]).shape == (0, 1152)


def test_tokenizer_splits_english_into_many_pieces() -> None:
    tokenizer = build_tokenizer(generated_vocab())
    assert len(tokenizer) == 30522
    enc = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.shape == (3, 77) and bool((ids[:, 0] == 101).all())
    real = ids[0][enc["attention_mask"][0].bool()].tolist()
    assert real[-1] == 102 and 100 not in real and len(set(real[1:-1])) >= 8  # none unknown, many distinct
    assert ids[0, len(real) :].eq(0).all()  # padded with [PAD]


def test_two_builds_give_identical_embeddings(random_text: TorchTextEncoder) -> None:
    before = torch.random.get_rng_state()
    again = build_text_encoder(EncoderConfig(name=NAME))
    torch.testing.assert_close(again.encode_text(PROMPTS), random_text.encode_text(PROMPTS), rtol=0, atol=0)
    # The fixed seed is used without moving the caller's global RNG.
    assert torch.equal(torch.random.get_rng_state(), before)


def test_truncation_warning_at_77_tokens(random_text: TorchTextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = "an H&E image of " + " ".join(["densely packed tumour cells"] * 10)
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.encoders.text"):
        random_text.encode_text(["tumour", "a tile of stroma"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.encoders.text"):
        emb = random_text.encode_text(["tumour", long_prompt])
    assert emb.shape == (2, 1152)
    [record] = caplog.records
    msg = record.getMessage()
    assert "1 of 2 prompts" in msg and "77 tokens" in msg and repr(long_prompt) in msg and "'tumour'" not in msg
    # 75 single-piece words + [CLS] and [SEP] fill the context exactly; one more word is cut.
    fits = " ".join(["a"] * 75)
    assert random_text.truncated_prompts([fits]) == []
    assert len(random_text.truncated_prompts([fits + " a"])) == 1


def test_provenance_says_random_weights(random_text: TorchTextEncoder) -> None:
    prov = random_text.provenance()
    assert prov["encoder"] == NAME and prov["tower"] == "text" and prov["random_weights"] is True
    assert prov["weights_sha256"] is None and prov["weight_files"] == {} and prov["seed"] == 0
    assert prov["embed_dim"] == 1152 and prov["context_length"] == 77 and prov["precision"] == "fp32"
    assert "random weights" in prov["note"]
    json.dumps(prov)


def test_concept_embeddings_over_shipped_set(random_text: TorchTextEncoder) -> None:
    prompts = load_concept_set("tissue").prompt_texts()
    concepts = build_concept_embeddings(random_text, prompts)
    assert concepts.shape == (13, 1152)
    torch.testing.assert_close(concepts.norm(dim=1), torch.ones(13))
