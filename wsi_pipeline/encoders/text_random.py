"""ConceptCLIP's text architecture with random weights (`conceptclip-arch-random`), the text side of the image
encoder of the same name: for shapes, memory and speed only. The weights are random, so the numbers mean nothing
(similarities, concept scores and zero-shot labels are noise); use it to size runs, never to read results.

The tower: a PubMedBERT-base encoder (transformers `BertModel`, PubMedBERT-base's sizes) whose pooled [CLS] output
a linear layer projects to the image side's 1152 dims, seeded so every build gives the same embeddings; context 77,
`logit_scale = 1 / 0.07` as CLIP initialises it. The real PubMedBERT vocabulary cannot be downloaded, so the
BertTokenizer reads a generated vocab.txt of the same size with BERT's special-token ids; ordinary English prompts
split into many word pieces, as with a real vocabulary.
"""

from __future__ import annotations

import itertools
import math
import string
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.encoders.base import ModelSource
from wsi_pipeline.encoders.config import EncoderConfig
from wsi_pipeline.encoders.text import TorchTextEncoder, bert_token_functions

CONTEXT_LENGTH = 77
EMBED_DIM = 1152  # the image side's width (vit_so400m_patch14_siglip_384)
RANDOM_SEED = 0
LOGIT_SCALE = math.exp(math.log(1 / 0.07))  # CLIP's initial log-temperature, exponentiated
# PubMedBERT-base (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract): BERT-base sizes, uncased.
PUBMEDBERT_BASE: dict[str, Any] = {  # Any: BertConfig's keyword types differ per argument
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
# BERT's special tokens at their usual ids; ids 1-99 are [unused0..98] as in BERT's own vocab.txt.
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _word_pieces() -> Iterator[str]:
    """Lowercase pieces, short first: characters, then 2- and 3-letter words, each also as a `##` continuation."""
    chars = string.ascii_lowercase + string.digits
    yield from string.ascii_lowercase + string.digits + string.punctuation
    yield from ("##" + c for c in chars)
    for n in (2, 3):
        words = ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=n)]
        yield from words
        yield from ("##" + w for w in words)


def generated_vocab(size: int = PUBMEDBERT_BASE["vocab_size"]) -> list[str]:
    """Exactly `size` tokens, BERT's special tokens at BERT's ids, the rest filled from `_word_pieces`."""
    by_id = {i: tok for tok, i in SPECIAL_IDS.items()}
    fixed = max(SPECIAL_IDS.values()) + 1
    vocab = [by_id.get(i, f"[unused{i - 1}]") for i in range(fixed)]
    vocab += itertools.islice(_word_pieces(), size - fixed)
    if len(vocab) != size:
        raise ValueError(f"the generated vocabulary has {len(vocab)} tokens, not {size}")
    return vocab


def build_tokenizer(vocab: list[str]) -> Any:
    """A real BertTokenizer over `vocab` (the fast one in transformers 5), lowercasing as PubMedBERT-uncased does."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory(prefix="wsi-random-vocab-") as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        # Positional: transformers 4 names it vocab_file, 5 names it vocab (and ignores vocab_file=).
        # model_max_length = BERT's positions: counting a long prompt's tokens should not warn; we cut at 77 ourselves.
        return BertTokenizer(str(path), do_lower_case=True, model_max_length=PUBMEDBERT_BASE["max_position_embeddings"])


class RandomConceptCLIPText(torch.nn.Module):
    """PubMedBERT-base + a linear projection of the pooled [CLS] output to the joint space."""

    def __init__(self, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(**PUBMEDBERT_BASE), add_pooling_layer=True)
        self.proj = torch.nn.Linear(PUBMEDBERT_BASE["hidden_size"], embed_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.proj(pooled)


def build_conceptclip_arch_random_text(cfg: EncoderConfig, device: torch.device | str = "cpu") -> TorchTextEncoder:
    """The random-weight ConceptCLIP text tower on `device` (fp32, or autocast on CUDA per encoder.precision)."""
    device = torch.device(device)
    # fork_rng: seed our build without moving the caller's global RNG (e.g. a training run's seed).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = RandomConceptCLIPText()
    tokenizer = build_tokenizer(generated_vocab())
    dtype = _AUTOCAST_DTYPES.get(cfg.precision) if device.type == "cuda" else None

    tokenize, count = bert_token_functions(tokenizer, CONTEXT_LENGTH)

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Reduced precision only on CUDA, as the image side: on CPU it is slower and changes the numbers.
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            return model(batch["input_ids"], batch["attention_mask"])

    source = ModelSource(model_id=f"random:PubMedBERT-base+proj{EMBED_DIM}:seed{RANDOM_SEED}", random_weights=True)
    return TorchTextEncoder(
        cfg.name,
        model,
        tokenize,
        forward,
        count,
        CONTEXT_LENGTH,
        LOGIT_SCALE,
        source,
        device,
        extra={
            "seed": RANDOM_SEED,
            "note": "random weights: shapes, memory and speed only; the numbers mean nothing",
            "model_class": type(model).__name__,
            "tokenizer": f"{type(tokenizer).__name__} (generated vocab, {len(tokenizer)} tokens)",
            "precision": cfg.precision if dtype is not None else "fp32",
        },
    )
