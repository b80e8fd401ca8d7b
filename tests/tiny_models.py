"""Build tiny, real models and save them to local directories, in the formats the encoders load.

Nothing here touches a network: weights are random (seeded), configs are written by hand.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

# --- a ConceptCLIP-like checkpoint that ships its own code (config.json auto_map -> modeling_*.py) ---

CONFIG_CODE = """
from transformers import PretrainedConfig


class TinyConceptConfig(PretrainedConfig):
    model_type = "tinyconcept"

    def __init__(self, image_size=64, patch_size=16, width=48, depth=2, heads=3, proj_dim=24, **kwargs):
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.depth = depth
        self.heads = heads
        self.proj_dim = proj_dim
        super().__init__(**kwargs)
"""

MODELING_CODE = '''
import os

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from transformers import PreTrainedModel

from .configuration_tinyconcept import TinyConceptConfig


class TinyConceptModel(PreTrainedModel):
    """ConceptCLIP's image contract in miniature: a timm ViT with attention (MAP) pooling;
    encode_image(pixel_values, normalize=False) -> (pooled (B, width), tokens (B, N, width))."""

    config_class = TinyConceptConfig
    base_model_prefix = "tinyconcept"

    def __init__(self, config):
        super().__init__(config)
        canary = os.environ.get("TINY_CONCEPT_CANARY")
        if canary:  # lets a test see whether this (remote) code ran at all
            with open(canary, "a") as f:
                f.write("instantiated\\n")
        self.visual = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.width,
            depth=config.depth, num_heads=config.heads, num_classes=0, global_pool="map",
            class_token=False, mlp_ratio=2.0,
        )
        self.image_proj = torch.nn.Linear(config.width, config.proj_dim)  # unused by encode_image, as upstream
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.post_init()

    def _init_weights(self, module):
        pass  # timm initialised the tower already; checkpoints overwrite everything anyway

    def encode_image(self, pixel_values, normalize=False):
        tokens = self.visual.forward_features(pixel_values)
        pooled = self.visual.forward_head(tokens)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled, tokens

    def forward(self, pixel_values=None, **kwargs):
        pooled, _ = self.encode_image(pixel_values, normalize=True)
        return {"image_features": pooled, "logit_scale": self.logit_scale.exp()}
'''

TINY_CONCEPT_WIDTH = 48


def siglip_processor_config(size: int) -> dict:
    """A SigLIP image-processor config as ConceptCLIP ships it: squash to size, bicubic (3), mean = std = 0.5."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def make_tiny_conceptclip(root: Path, image_size: int = 64, seed: int = 0) -> Path:
    """A directory loadable with AutoModel.from_pretrained(..., trust_remote_code=True, local_files_only=True)."""
    from transformers import AutoConfig, AutoModel

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    (d / "configuration_tinyconcept.py").write_text(CONFIG_CODE)
    (d / "modeling_tinyconcept.py").write_text(MODELING_CODE)
    auto_map = {
        "AutoConfig": "configuration_tinyconcept.TinyConceptConfig",
        "AutoModel": "modeling_tinyconcept.TinyConceptModel",
    }
    cfg = {
        "model_type": "tinyconcept",
        "auto_map": auto_map,
        "image_size": image_size,
        "patch_size": 16,
        "width": TINY_CONCEPT_WIDTH,
        "depth": 2,
        "heads": 3,
        "proj_dim": 24,
        "architectures": ["TinyConceptModel"],
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(str(d), safe_serialization=True)
    saved = json.loads((d / "config.json").read_text())
    saved["auto_map"] = auto_map  # keep the remote-code pointer whatever save_pretrained wrote
    (d / "config.json").write_text(json.dumps(saved, indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(siglip_processor_config(image_size), indent=2))
    assert (d / "model.safetensors").is_file()
    return d


def put_in_hub_cache(model_dir: Path, cache_dir: Path, repo_id: str, revision: str) -> Path:
    """Lay a model directory out as a Hugging Face cache snapshot (models--org--name/snapshots/<rev>)."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


# --- ConceptCLIP with both towers (image + text): what stage 4 scores tiles with ---

DUAL_CONFIG_CODE = """
from transformers import PretrainedConfig


class TinyDualConceptConfig(PretrainedConfig):
    model_type = "tinydualconcept"

    def __init__(self, image_size=64, patch_size=16, width=48, depth=2, heads=3, vocab_size=40, text_width=32,
                 project_pooled=False, **kwargs):
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.depth = depth
        self.heads = heads
        self.vocab_size = vocab_size
        self.text_width = text_width
        self.project_pooled = project_pooled
        super().__init__(**kwargs)
"""

DUAL_MODELING_CODE = '''
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertModel, PreTrainedModel

from .configuration_tinydualconcept import TinyDualConceptConfig


class TinyDualConceptModel(PreTrainedModel):
    """ConceptCLIP's contract in miniature, both towers: a timm ViT with attention (MAP) pooling and a BERT text tower
    projected to the same width; logit_scale (stored as its log) and logit_bias are learnt scalars.
    encode_image(pixel_values, normalize=False) -> (pooled, tokens); encode_text(input_ids, attention_mask=None,
    normalize=False) -> (projected CLS, tokens); forward(pixel_values, input_ids, attention_mask) -> a dict with
    image_features and text_features (unit rows), logit_scale (exp'd), logit_bias and the token features, so
    logits = logit_scale * image_features @ text_features.T (+ logit_bias), as upstream. With config.project_pooled
    (a deliberately wrong checkpoint) the forward's image_features are a projection encode_image never applies."""

    config_class = TinyDualConceptConfig
    base_model_prefix = "tinydualconcept"

    def __init__(self, config):
        super().__init__(config)
        self.visual = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.width,
            depth=config.depth, num_heads=config.heads, num_classes=0, global_pool="map",
            class_token=False, mlp_ratio=2.0,
        )
        bert = BertConfig(vocab_size=config.vocab_size, hidden_size=config.text_width, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=80)
        self.text = BertModel(bert, add_pooling_layer=False)
        self.text_proj = torch.nn.Linear(config.text_width, config.width)
        self.image_proj = torch.nn.Linear(config.width, config.width)  # patch tokens only, as upstream
        self.pooled_proj = torch.nn.Linear(config.width, config.width)  # used only with project_pooled
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0))
        self.post_init()

    def _init_weights(self, module):
        pass  # timm/BERT initialised the towers already; checkpoints overwrite everything anyway

    def encode_image(self, pixel_values, normalize=False):
        tokens = self.visual.forward_features(pixel_values)
        pooled = self.visual.forward_head(tokens)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens

    def encode_text(self, input_ids, attention_mask=None, normalize=False):
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = self.text_proj(tokens[:, 0])
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, **kwargs):
        out = {"logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        if pixel_values is not None:
            pooled, tokens = self.encode_image(pixel_values)
            if self.config.project_pooled:
                pooled = self.pooled_proj(pooled)
            out["image_features"] = F.normalize(pooled, dim=-1)
            out["image_token_features"] = self.image_proj(tokens)
        if input_ids is not None:
            text, tokens = self.encode_text(input_ids, attention_mask=attention_mask, normalize=True)
            out["text_features"] = text
            out["text_token_features"] = tokens
        return out
'''

DUAL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "h", "&", "e", "image", "of", "a", "tile", "."]
DUAL_VOCAB += ["showing", "tumour", "tumor", "stroma", "necrosis", "lymphocytes", "fat", "cells", "dense", "glass"]
DUAL_VOCAB += ["pink", "purple", "photo", "histology", "tissue", "blue", "background", "white", "mucin", "muscle"]


def make_tiny_dual_conceptclip(root: Path, image_size: int = 64, seed: int = 0, project_pooled: bool = False) -> Path:
    """A ConceptCLIP-like checkpoint with both towers (remote code, BertTokenizer vocab.txt), loadable by the image
    encoder (`encoder.name: conceptclip`) and the text tower alike. `project_pooled=True` writes a model whose
    image-text logits use a projection of the pooled output: stored features are then not what the logits use."""
    from transformers import AutoConfig, AutoModel

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    (d / "configuration_tinydualconcept.py").write_text(DUAL_CONFIG_CODE)
    (d / "modeling_tinydualconcept.py").write_text(DUAL_MODELING_CODE)
    auto_map = {
        "AutoConfig": "configuration_tinydualconcept.TinyDualConceptConfig",
        "AutoModel": "modeling_tinydualconcept.TinyDualConceptModel",
    }
    cfg = {
        "model_type": "tinydualconcept",
        "auto_map": auto_map,
        "image_size": image_size,
        "patch_size": 16,
        "width": TINY_CONCEPT_WIDTH,
        "depth": 2,
        "heads": 3,
        "vocab_size": len(DUAL_VOCAB),
        "text_width": 32,
        "project_pooled": project_pooled,
        "architectures": ["TinyDualConceptModel"],
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(str(d), safe_serialization=True)
    saved = json.loads((d / "config.json").read_text())
    saved["auto_map"] = auto_map  # keep the remote-code pointer whatever save_pretrained wrote
    (d / "config.json").write_text(json.dumps(saved, indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(siglip_processor_config(image_size), indent=2))
    (d / "vocab.txt").write_text("\n".join(DUAL_VOCAB) + "\n")
    assert (d / "model.safetensors").is_file()
    return d


# --- open_clip ---

TINY_OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
TINY_OPEN_CLIP_PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def make_tiny_open_clip(root: Path, seed: int = 0) -> Path:
    """An open_clip hf-hub style directory: open_clip_config.json + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG, "preprocess_cfg": TINY_OPEN_CLIP_PREPROCESS}, indent=2)
    )
    return d


def register_tiny_open_clip_arch(root: Path, name: str = "tiny-clip-test") -> str:
    """Register the tiny config as a built-in architecture name (for the `model_id` + checkpoint-file path)."""
    import open_clip

    cfg_dir = Path(root)
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{name}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(cfg_dir)
    return name


# --- timm ---

TINY_TIMM_ARCH = "vit_tiny_patch16_224"
TINY_TIMM_ARGS = {"img_size": 64, "depth": 2, "embed_dim": 48, "num_heads": 3}


def make_tiny_timm(root: Path, seed: int = 0) -> Path:
    """A timm hub-style directory (config.json with architecture/model_args + model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(TINY_TIMM_ARCH, pretrained=False, num_classes=5, **TINY_TIMM_ARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(
        json.dumps({"architecture": TINY_TIMM_ARCH, "num_classes": 5, "model_args": TINY_TIMM_ARGS}, indent=2)
    )
    return d


# --- VisionEncoderDecoder (CLIP vision encoder + GPT-2 decoder, as medical captioners) ---

TINY_VED_HIDDEN = 32


def make_tiny_vision_encoder_decoder(root: Path, image_size: int = 64, seed: int = 0) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    enc = CLIPVisionConfig(
        hidden_size=TINY_VED_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=16,
    )
    dec = GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=cfg)
    model.save_pretrained(str(d), safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        resample=3,
    ).save_pretrained(str(d))
    return d


# --- a guard that fails any attempt to open a network connection ---


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make every INET socket connect fail loudly (and record it); unix sockets stay usable."""
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return attempts
