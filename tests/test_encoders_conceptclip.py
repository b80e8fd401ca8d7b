"""The ConceptCLIP loading path, exercised with a tiny checkpoint that ships its own code (auto_map), offline."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONCEPT_WIDTH, make_tiny_conceptclip, no_network, put_in_hub_cache  # noqa: F401

from wsi_pipeline.encoders import CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION, EncoderConfig, build_encoder
from wsi_pipeline.errors import EncoderError

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def tiny_cc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_conceptclip(tmp_path_factory.mktemp("tinyconcept") / "model", image_size=64)


@pytest.fixture(scope="module")
def tiny_cc_encoder(tiny_cc: Path):
    return build_encoder(EncoderConfig(path=str(tiny_cc), trust_remote_code=True))


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_remote_code_refused_without_opt_in(tiny_cc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary.txt"
    monkeypatch.setenv("TINY_CONCEPT_CANARY", str(canary))
    with pytest.raises(EncoderError) as err:
        build_encoder(EncoderConfig(path=str(tiny_cc)))
    msg = _one_line(err)
    assert "trust_remote_code: true" in msg and "modeling_tinyconcept.py" in msg
    assert not canary.exists(), "the checkpoint's own code ran although trust_remote_code was false"
    # With the opt-in, the same code does run (the canary proves which path was taken).
    build_encoder(EncoderConfig(path=str(tiny_cc), trust_remote_code=True))
    assert canary.read_text().count("instantiated") == 1


def test_loads_with_opt_in_and_embeds(tiny_cc_encoder, no_network: list) -> None:  # noqa: F811
    enc = tiny_cc_encoder
    assert enc.embed_dim == TINY_CONCEPT_WIDTH
    assert enc.preprocessing.to_dict() == {
        "size": 64,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resize": "squash",
    }
    gen = torch.Generator().manual_seed(1)
    for size in (64, 100):  # the model's size, and one that must be resized on the device
        tiles = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8, generator=gen)
        emb = enc.encode_uint8(tiles)
        assert emb.shape == (3, TINY_CONCEPT_WIDTH) and emb.dtype == torch.float32
        assert torch.isfinite(emb).all()
        assert not torch.allclose(emb[0], emb[1])
    assert no_network == []


def test_weights_come_from_the_checkpoint(tiny_cc: Path, tiny_cc_encoder) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(tiny_cc / "model.safetensors"))
    state = tiny_cc_encoder.module.state_dict()
    assert set(saved) <= set(state)
    for key, value in saved.items():
        torch.testing.assert_close(state[key].cpu(), value, rtol=0, atol=0)


def test_embedding_is_encode_image_pooled_output(tiny_cc: Path, tiny_cc_encoder) -> None:
    """encode_pixels == model.encode_image(pixels, normalize=False)[0], the contract named in the issue."""
    model = tiny_cc_encoder.module
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pooled, tokens = model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(tiny_cc_encoder.encode_pixels(pixels), pooled)
    assert tokens.shape[:2] == (2, 16)  # 64/16 squared patches: the tuple's second item is the token grid


def test_provenance_records_revision_and_checksum(tiny_cc: Path, tiny_cc_encoder) -> None:
    prov = tiny_cc_encoder.provenance()
    sha = hashlib.sha256((tiny_cc / "model.safetensors").read_bytes()).hexdigest()
    assert prov["weight_files"] == {"model.safetensors": sha}
    assert len(prov["weights_sha256"]) == 64
    assert prov["random_weights"] is False and prov["trust_remote_code"] is True
    assert prov["encoder"] == "conceptclip" and prov["path"] == str(tiny_cc)
    assert {"torch", "transformers"} <= set(prov["library_versions"])
    assert tiny_cc_encoder.provenance() == prov  # cached, stable


def test_pinned_revision_from_hub_cache_offline(tiny_cc: Path, tmp_path: Path, no_network: list) -> None:  # noqa: F811
    """The default config (hub id + pinned revision, local_files_only) resolves a cached snapshot, no network."""
    cache = tmp_path / "hub"
    put_in_hub_cache(tiny_cc, cache, CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION)
    enc = build_encoder(EncoderConfig(cache_dir=str(cache), trust_remote_code=True))
    prov = enc.provenance()
    assert prov["model_id"] == CONCEPTCLIP_REPO and prov["revision"] == CONCEPTCLIP_REVISION
    assert prov["weights_sha256"] is not None and enc.embed_dim == TINY_CONCEPT_WIDTH
    assert no_network == []


def test_missing_weights_in_cache_says_how_to_get_them(tmp_path: Path, no_network: list) -> None:  # noqa: F811
    with pytest.raises(EncoderError) as err:
        build_encoder(EncoderConfig(cache_dir=str(tmp_path / "empty"), trust_remote_code=True))
    msg = _one_line(err)
    assert f"hf download {CONCEPTCLIP_REPO} --revision {CONCEPTCLIP_REVISION}" in msg
    assert "encoder.path" in msg and f"https://huggingface.co/{CONCEPTCLIP_REPO}" in msg
    assert no_network == []


def test_other_revision_not_cached(tiny_cc: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    put_in_hub_cache(tiny_cc, cache, CONCEPTCLIP_REPO, CONCEPTCLIP_REVISION)
    other = "0" * 40
    with pytest.raises(EncoderError) as err:
        build_encoder(EncoderConfig(cache_dir=str(cache), revision=other, trust_remote_code=True))
    assert f"--revision {other}" in _one_line(err)


def test_missing_local_directory(tmp_path: Path) -> None:
    with pytest.raises(EncoderError) as err:
        build_encoder(EncoderConfig(path=str(tmp_path / "nowhere"), trust_remote_code=True))
    msg = _one_line(err)
    assert "does not exist" in msg and "hf download" in msg


def test_directory_without_weights(tiny_cc: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(tiny_cc, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(EncoderError) as err:
        build_encoder(EncoderConfig(path=str(partial), trust_remote_code=True))
    msg = _one_line(err)
    assert "no weight files" in msg and f"--revision {CONCEPTCLIP_REVISION}" in msg


def test_directory_without_config(tiny_cc: Path, tmp_path: Path) -> None:
    partial = tmp_path / "noconfig"
    shutil.copytree(tiny_cc, partial, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(EncoderError) as err:
        build_encoder(EncoderConfig(path=str(partial), trust_remote_code=True))
    assert "config.json is missing" in _one_line(err)
