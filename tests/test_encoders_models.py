"""Registry, config, and the open_clip / timm / VisionEncoderDecoder / random-architecture encoders (tiny, local)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydantic
import pytest
import torch
from tiny_models import (  # noqa: F401
    TINY_OPEN_CLIP_CFG,
    TINY_VED_HIDDEN,
    make_tiny_open_clip,
    make_tiny_timm,
    make_tiny_vision_encoder_decoder,
    no_network,
    put_in_hub_cache,
    register_tiny_open_clip_arch,
)

from wsi_pipeline.encoders import (
    EncoderConfig,
    available_encoders,
    build_encoder,
    check_finite,
    register_encoder,
)
from wsi_pipeline.encoders.base import sha256_file
from wsi_pipeline.errors import EncoderError, FeatureError

pytestmark = pytest.mark.usefixtures("no_network")


def _tiles(n: int = 3, size: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_registry_and_config_defaults() -> None:
    names = available_encoders()
    for name in (
        "conceptclip",
        "conceptclip-arch-random",
        "open_clip",
        "timm",
        "vision-encoder-decoder",
        "stain-texture",
    ):
        assert name in names
    cfg = EncoderConfig()
    assert (cfg.name, cfg.trust_remote_code, cfg.local_files_only, cfg.precision, cfg.compile) == (
        "conceptclip",
        False,
        True,
        "bf16",
        False,
    )
    with pytest.raises(pydantic.ValidationError):
        EncoderConfig(nmae="timm")  # extra="forbid" catches typos
    with pytest.raises(pydantic.ValidationError):
        EncoderConfig(precision="int8")
    with pytest.raises(EncoderError, match="available: .*stain-texture"):
        build_encoder(EncoderConfig(name="no-such-encoder"))


def test_register_custom_encoder() -> None:
    from wsi_pipeline.encoders.stain_texture import StainTextureEncoder

    register_encoder("my-texture", lambda cfg, device: StainTextureEncoder(cfg, device))
    enc = build_encoder(EncoderConfig(name="my-texture"))
    assert enc.name == "my-texture" and "my-texture" in available_encoders()


def test_open_clip_local_dir_and_checkpoint_file(tmp_path: Path) -> None:
    import open_clip

    d = make_tiny_open_clip(tmp_path / "oc")
    enc = build_encoder(EncoderConfig(name="open_clip", path=str(d)))
    assert enc.embed_dim == TINY_OPEN_CLIP_CFG["embed_dim"]
    assert enc.preprocessing.size == 64 and enc.preprocessing.mean[0] == pytest.approx(0.48145466)
    emb = enc.encode_uint8(_tiles())
    assert emb.shape == (3, 24) and emb.dtype == torch.float32
    # The same weights through the built-in-architecture + checkpoint-file route give the same embeddings.
    arch = register_tiny_open_clip_arch(tmp_path / "cfgs")
    enc2 = build_encoder(EncoderConfig(name="open_clip", model_id=arch, path=str(d / "open_clip_model.safetensors")))
    torch.testing.assert_close(enc2.encode_uint8(_tiles()), emb)
    # and they are open_clip's own encode_image of the preprocessed pixels
    model = open_clip.create_model(f"local-dir:{d}", pretrained_text=False).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(enc.encode_pixels(pixels), model.encode_image(pixels, normalize=False))
    sha = hashlib.sha256((d / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert enc.provenance()["weight_files"] == {"open_clip_model.safetensors": sha}


def test_whylesionclip_preset_from_hub_cache(tmp_path: Path, no_network: list) -> None:  # noqa: F811
    d = make_tiny_open_clip(tmp_path / "oc")
    rev = "1" * 40
    put_in_hub_cache(d, tmp_path / "hub", "yyupenn/whylesionclip", rev)
    enc = build_encoder(EncoderConfig(name="whylesionclip", cache_dir=str(tmp_path / "hub"), revision=rev))
    prov = enc.provenance()
    assert prov["model_id"] == "hf-hub:yyupenn/whylesionclip" and prov["revision"] == rev
    assert enc.encode_uint8(_tiles()).shape == (3, 24)
    with pytest.raises(EncoderError, match="hf download yyupenn/whylesionclip"):
        build_encoder(EncoderConfig(name="whylesionclip", cache_dir=str(tmp_path / "empty")))
    assert no_network == []


def test_timm_local_dir(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    d = make_tiny_timm(tmp_path / "timm")
    enc = build_encoder(EncoderConfig(name="timm", path=str(d)))
    assert enc.embed_dim == 48 and enc.preprocessing.size == 64
    assert enc.encode_uint8(_tiles(size=100)).shape == (3, 48)
    saved = load_file(str(d / "model.safetensors"))
    state = enc.module.state_dict()
    for key, value in saved.items():
        if not key.startswith("head."):  # the classifier is dropped: pooled features only
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert not any(k.startswith("head.") and v.numel() for k, v in state.items())


def test_timm_checkpoint_file_needs_architecture(tmp_path: Path) -> None:
    d = make_tiny_timm(tmp_path / "timm")
    with pytest.raises(EncoderError, match="encoder.model_id"):
        build_encoder(EncoderConfig(name="timm", path=str(d / "model.safetensors")))
    with pytest.raises(EncoderError, match="does not fit"):
        build_encoder(EncoderConfig(name="timm", model_id="resnet18", path=str(d / "model.safetensors")))


def test_vision_encoder_decoder_tower(tmp_path: Path) -> None:
    from transformers import VisionEncoderDecoderModel

    d = make_tiny_vision_encoder_decoder(tmp_path / "ved")
    enc = build_encoder(EncoderConfig(name="vision-encoder-decoder", path=str(d)))
    assert enc.embed_dim == TINY_VED_HIDDEN
    prov = enc.provenance()
    assert prov["pooling"] == "pooler_output" and prov["encoder_type"] == "clip_vision_model"
    assert prov["preprocessing_source"] == "preprocessor_config.json" and enc.preprocessing.size == 64
    assert enc.encode_uint8(_tiles()).shape == (3, TINY_VED_HIDDEN)
    full = VisionEncoderDecoderModel.from_pretrained(str(d)).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = full.encoder(pixel_values=pixels).pooler_output
    torch.testing.assert_close(enc.encode_pixels(pixels), expected)
    assert not hasattr(enc.module, "lm_head")  # only the vision tower is kept


def test_conceptclip_arch_random_small_input() -> None:
    """The so400m/14 MAP-pooled architecture (1152-d), at a small input so it runs in seconds on CPU."""
    enc = build_encoder(EncoderConfig(name="conceptclip-arch-random", image_size=28))
    assert enc.embed_dim == 1152 and enc.preprocessing.size == 28
    assert type(enc.module.attn_pool).__name__ == "AttentionPoolLatent"
    emb = enc.encode_uint8(_tiles(n=2, size=64))
    assert emb.shape == (2, 1152) and torch.isfinite(emb).all()
    prov = enc.provenance()
    assert prov["random_weights"] is True and prov["weights_sha256"] is None
    assert prov["model_id"] == "timm:vit_so400m_patch14_siglip_384"


def test_random_architecture_is_seeded() -> None:
    cfg = EncoderConfig(name="conceptclip-arch-random", model_id="vit_tiny_patch16_224", image_size=32)
    a, b = build_encoder(cfg), build_encoder(cfg)
    torch.testing.assert_close(a.encode_uint8(_tiles()), b.encode_uint8(_tiles()), rtol=0, atol=0)


def test_cpu_ignores_reduced_precision(tmp_path: Path) -> None:
    d = make_tiny_timm(tmp_path / "timm")
    bf16 = build_encoder(EncoderConfig(name="timm", path=str(d), precision="bf16"))
    fp32 = build_encoder(EncoderConfig(name="timm", path=str(d), precision="fp32"))
    torch.testing.assert_close(bf16.encode_uint8(_tiles()), fp32.encode_uint8(_tiles()), rtol=0, atol=0)
    assert bf16.autocast_dtype is None and bf16.provenance()["precision"] == "fp32"


def test_check_finite() -> None:
    check_finite(torch.zeros(4, 8), "slide A")
    bad = torch.zeros(4, 8)
    bad[1, 3], bad[3, 0] = float("nan"), float("inf")
    with pytest.raises(FeatureError) as err:
        check_finite(bad, "slide A tiles 0-3")
    msg = str(err.value)
    assert "\n" not in msg and "slide A tiles 0-3" in msg and "2 of 4" in msg and "rows 1, 3" in msg


def test_sha256_uses_hub_blob_names_and_caches(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    assert sha256_file(f) == hashlib.sha256(b"weights").hexdigest()
    blob_name = "ab" * 32  # the HF cache names LFS blobs by their sha256: trusted, not recomputed
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / blob_name).write_bytes(b"big weights")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blobs / blob_name)
    assert sha256_file(link) == blob_name
