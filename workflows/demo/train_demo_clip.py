"""Train the demo dual encoder and save it to workflows/demo/demo_clip/ (deterministic; run from the repo root).

    .venv/bin/python workflows/demo/train_demo_clip.py

ConceptCLIP's weights cannot be downloaded everywhere, so the demo and the tests use this small CLIP-style model
with ConceptCLIP's interface (remote code in the checkpoint folder, BertTokenizer vocab.txt, SigLIP-style
preprocessor config). It is trained on tiles whose ground truth is known: 256 px crops at 0.5 µm/px of the
synthetic slide generator's own tissue textures (wsi_pipeline.synthetic.render_texture: tumour, stroma,
lymphocytes, necrosis, adipose, mucin, plus glass), in three stain presets, rotated / flipped, JPEG-compressed
as the slides are, some cut by a tissue edge; each paired with a caption from a small grammar (several phrasings
per texture, many templates, the concept sets' vocabulary). Loss: CLIP's symmetric cross-entropy over
image-caption logits, where every caption of an image's class counts as a match. Seeds: training atlases use
TRAIN_SEED + k, the held-out check HOLDOUT_SEED + k; the demo cohort (make_demo.py) and tests/test_demo_clip.py
use other seeds. Runs on the CPU in about two minutes; the same machine and thread count give the same bytes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import yaml

DEMO = Path(__file__).resolve().parent
OUT = DEMO / "demo_clip"
REPO = DEMO.parents[1]
sys.path.insert(0, str(DEMO))  # the checkpoint folder's own code, imported as the namespace package demo_clip

from demo_clip.configuration_democlip import DemoClipConfig  # noqa: E402
from demo_clip.modeling_democlip import DemoClipModel  # noqa: E402

from wsi_pipeline.encoders.config import Preprocessing  # noqa: E402
from wsi_pipeline.encoders.preprocess import preprocess_on_device  # noqa: E402
from wsi_pipeline.synthetic import STAINS, TEXTURE_CONCEPTS, TEXTURES, render_texture, write_synthetic_slide  # noqa: E402

SEED = 0
TRAIN_SEED, HOLDOUT_SEED = 1_000_000, 1_500_000
IMAGE_SIZE, TILE, MPP = 64, 256, 0.5
PREP = Preprocessing(size=IMAGE_SIZE, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
TRAIN_STAINS = ("he", "he_light", "he_dark")
ATLASES_PER_STAIN, CROPS_PER_ATLAS, ATLAS_SIDE = 6, 28, 768
CLASSES = (*TEXTURES, "background")
STEPS, BATCH, LR = 200, 112, 3e-3
CONTEXT = 77
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# --- captions -------------------------------------------------------------------------------------------------

PHRASES = {
    "tumour": [
        "tumor epithelium",
        "tumour epithelium",
        "carcinoma",
        "invasive carcinoma",
        "adenocarcinoma",
        "malignant epithelium",
        "malignant epithelial cells",
        "a sheet of tumor cells",
        "sheets of carcinoma cells",
        "atypical carcinoma cells",
        "crowded atypical cells",
        "pleomorphic tumor cells",
        "a solid tumor nest",
        "tumor cells forming irregular glands",
        "malignant glands",
        "cancer cells with large vesicular nuclei",
        "atypical epithelial cells with prominent nucleoli",
        "crowded pleomorphic nuclei",
        "viable tumor",
        "sheets of malignant cells",
        "poorly differentiated carcinoma",
        "epithelial tumor cells",
    ],
    "stroma": [
        "stroma",
        "tumor stroma",
        "tumour stroma",
        "fibrous stroma",
        "collagenous stroma",
        "desmoplastic stroma",
        "fibrous connective tissue",
        "connective tissue",
        "collagen",
        "pink wavy collagen fibers",
        "fibroblasts and collagen",
        "spindle shaped fibroblasts",
        "wavy fibers with sparse elongated nuclei",
        "dense collagen bundles",
        "fibrosis",
        "stromal tissue",
        "desmoplasia with fibroblasts",
    ],
    "lymphocytes": [
        "lymphocytes",
        "a lymphocytic infiltrate",
        "a dense lymphocytic infiltrate",
        "dense lymphocytes",
        "a lymphoid aggregate",
        "small round lymphocytes",
        "small round cells with dark nuclei",
        "sheets of small round cells",
        "round dark nuclei with scant cytoplasm",
        "immune cells",
        "tumor infiltrating lymphocytes",
        "lymphoid tissue",
        "a sheet of lymphocytes",
        "densely packed lymphocytes",
    ],
    "necrosis": [
        "necrosis",
        "tumor necrosis",
        "tumour necrosis",
        "necrotic debris",
        "coagulative necrosis",
        "necrotic tissue",
        "ghost cells",
        "ghost outlines of dead cells",
        "nuclear fragments",
        "nuclear dust",
        "karyorrhectic debris",
        "fragmented nuclei in necrotic debris",
        "dead tumor cells",
        "granular debris",
        "pale eosinophilic necrotic material",
        "comedo necrosis",
    ],
    "adipose": [
        "adipose tissue",
        "fat",
        "fat cells",
        "mature fat cells",
        "adipocytes",
        "fatty tissue",
        "large clear vacuoles",
        "adipose tissue with fat vacuoles",
        "empty fat vacuoles",
        "mature adipocytes",
        "fat cells with thin membranes",
        "clear polygonal fat cells",
        "subcutaneous fat",
        "fat lobules",
    ],
    "mucin": [
        "mucin",
        "extracellular mucin",
        "mucin pools",
        "pools of mucin",
        "pale blue mucin",
        "blue-gray mucin",
        "mucinous material",
        "mucoid material",
        "lakes of mucin",
        "wispy pale mucin",
        "mucin with floating cells",
        "mucin with floating tumor cells",
        "mucinous pools with few cells",
        "extracellular mucus",
    ],
    "background": [
        "background",
        "glass",
        "empty glass",
        "a blank area",
        "no tissue",
        "an empty slide",
        "blank slide",
        "an empty area without tissue",
        "glass background",
    ],
}
# short modifiers put before a phrase now and then
MODIFIERS = {
    "tumour": ["malignant", "atypical", "crowded", "invasive"],
    "stroma": ["fibrous", "pink", "wavy", "dense"],
    "lymphocytes": ["dense", "small", "dark"],
    "necrosis": ["extensive", "pale", "granular"],
    "adipose": ["mature", "clear", "benign"],
    "mucin": ["pale", "extracellular", "abundant"],
    "background": [],
}
TEMPLATES = [
    "{}",
    "{}.",
    "an H&E image of {}.",
    "a histopathology photo of {}.",
    "an H&E stained section showing {}.",
    "a microscopy image of {}.",
    "a photomicrograph of {}.",
    "an image of {}.",
    "a tile of {}.",
    "histology showing {}.",
    "this patch shows {}.",
    "{} on an H&E slide.",
    "a region of {}.",
    "an H&E stained tile with {}.",
    "a pathology image showing {}.",
    "a histology image of {}.",
]


def caption(rng: np.random.Generator, cls: str) -> str:
    phrases = PHRASES[cls]
    p = str(rng.choice(phrases))
    u = rng.uniform()
    if u < 0.25 and len(phrases) > 1:  # two phrasings of the same texture
        q = str(rng.choice([x for x in phrases if x != p]))
        p = f"{p} with {q}" if rng.uniform() < 0.5 else f"{p} and {q}"
    elif u < 0.4 and MODIFIERS[cls] and not p.startswith(("a ", "an ")):
        p = f"{rng.choice(MODIFIERS[cls])} {p}"
    return str(rng.choice(TEMPLATES)).format(p)


def concept_texts() -> list[str]:
    """Every prompt and template of the shipped concept sets (their words must be in the vocabulary)."""
    out = []
    for path in sorted((REPO / "workflows" / "concepts").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        out += [t.replace("{}", "") for t in data.get("templates", [])]
        out += [p for c in data.get("concepts", []) for p in c.get("prompts", [])]
    return out


def build_vocab(texts: list[str]) -> list[str]:
    """[PAD] [UNK] [CLS] [SEP] [MASK], then every word / punctuation mark BERT's lower-casing splitter finds."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm, split = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = {w for t in texts for w, _ in split.pre_tokenize_str(norm.normalize_str(t))}
    return SPECIAL + sorted(words - set(SPECIAL))


# --- tiles ----------------------------------------------------------------------------------------------------


def jpeg(tile: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through the SVS writer's JPEG settings (RGB colour space, no chroma subsampling)."""
    data = imagecodecs.jpeg_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1))
    return imagecodecs.jpeg_decode(data)


def glass(seed: int, tmp: Path) -> np.ndarray:
    """A blank slide from the generator (glass colour and noise) as one array."""
    spec = write_synthetic_slide(
        tmp / f"glass_{seed}.tif",
        width=1024,
        height=1024,
        mpp=MPP,
        fmt="flat",
        regions=(),
        compression="none",
        seed=seed,
    )
    return tifffile.imread(spec.path)


def edge_mask(rng: np.random.Generator) -> np.ndarray:
    """A tissue mask cut by a smooth edge (a large circle's rim) keeping 30-90% of the tile."""
    yy, xx = np.mgrid[0:TILE, 0:TILE] + 0.5
    keep = rng.uniform(0.3, 0.9)
    ang = rng.uniform(0, 2 * np.pi)
    r = rng.uniform(1.5, 6) * TILE
    cx, cy = TILE / 2 + np.cos(ang) * r, TILE / 2 + np.sin(ang) * r
    d = np.hypot(xx - cx, yy - cy)
    return d < np.quantile(d, keep)


def make_tiles(seed0: int, atlases: int, crops: int, glass_img: np.ndarray, rng: np.random.Generator):
    """uint8 tiles (N, 256, 256, 3) and class indices: crops of texture atlases, some cut by a tissue edge."""
    tiles, labels = [], []
    for ci, name in enumerate(TEXTURES):
        for stain in TRAIN_STAINS:
            eosin, hema = STAINS[stain]
            for k in range(atlases):
                density = float(rng.uniform(0.75, 1.35))
                atlas = render_texture(name, ATLAS_SIDE, MPP, eosin, hema, density, seed0 + 100 * ci + k)
                for _ in range(crops):
                    x, y = rng.integers(0, ATLAS_SIDE - TILE, 2)
                    tile = np.rot90(atlas[y : y + TILE, x : x + TILE], int(rng.integers(4)))
                    if rng.uniform() < 0.25:
                        gx, gy = rng.integers(0, glass_img.shape[0] - TILE, 2)
                        tile = np.where(edge_mask(rng)[..., None], tile, glass_img[gy : gy + TILE, gx : gx + TILE])
                    tiles.append(jpeg(np.ascontiguousarray(tile), int(rng.choice([60, 70, 80]))))
                    labels.append(ci)
    n_bg = crops * atlases * 2
    for _ in range(n_bg):
        gx, gy = rng.integers(0, glass_img.shape[0] - TILE, 2)
        tiles.append(jpeg(np.ascontiguousarray(glass_img[gy : gy + TILE, gx : gx + TILE]), 60))
        labels.append(len(TEXTURES))
    return np.stack(tiles), np.asarray(labels)


def preprocess(tiles: np.ndarray) -> torch.Tensor:
    out = [preprocess_on_device(torch.from_numpy(tiles[i : i + 256]), PREP) for i in range(0, len(tiles), 256)]
    return torch.cat(out).contiguous()


# --- training -------------------------------------------------------------------------------------------------


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP; every caption of an image's class is a match (soft targets)."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    same = (y[:, None] == y[None, :]).float()
    li = -(same / same.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    lt = -(same / same.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (li + lt) / 2


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips and a mild colour jitter in normalised pixel space."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-2), x)
    gain = 1 + 0.04 * torch.randn(b, 3, 1, 1, generator=g)
    shift = 0.04 * torch.randn(b, 3, 1, 1, generator=g)
    return x * gain + shift


@torch.no_grad()
def evaluate(model: DemoClipModel, x: torch.Tensor, y: np.ndarray, tokenizer) -> dict:
    """Zero-shot check on held-out tiles with the shipped concept set: per-texture AUC and accuracy."""
    from sklearn.metrics import roc_auc_score

    from wsi_pipeline.explain.concepts import load_concept_set

    cs = load_concept_set("tissue")
    names = [TEXTURE_CONCEPTS[t] for t in TEXTURES] + ["background"]
    prompts = {c.name: [t.replace("{}", p) for p in c.prompts for t in cs.templates] for c in cs.concepts}
    rows = []
    for n in names:
        enc = tokenizer(prompts[n], padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
        e = F.normalize(model.encode_text(enc["input_ids"], enc["attention_mask"])[0], dim=-1).mean(0)
        rows.append(F.normalize(e, dim=0))
    concepts = torch.stack(rows)
    img = torch.cat([F.normalize(model.encode_image(x[i : i + 256])[0], dim=-1) for i in range(0, len(x), 256)])
    cos = (img @ concepts.T).numpy()
    auc = {TEXTURES[i]: float(roc_auc_score(y == i, cos[:, i])) for i in range(len(TEXTURES))}
    acc = float((cos.argmax(1) == y).mean())
    return {"auc": auc, "accuracy": acc}


def main() -> None:
    t0 = time.time()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)
    import tempfile

    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        glass_train, glass_hold = glass(TRAIN_SEED, Path(tmp)), glass(HOLDOUT_SEED, Path(tmp))
    tiles, labels = make_tiles(TRAIN_SEED, ATLASES_PER_STAIN, CROPS_PER_ATLAS, glass_train, rng)
    hold_tiles, hold_labels = make_tiles(HOLDOUT_SEED, 2, 10, glass_hold, np.random.default_rng(SEED + 1))
    x, x_hold = preprocess(tiles), preprocess(hold_tiles)
    y = torch.from_numpy(labels)
    print(f"{len(x)} training tiles, {len(x_hold)} held out ({time.time() - t0:.0f} s)")

    caps = {c: sorted({caption(rng, c) for _ in range(600)}) for c in CLASSES}
    vocab = build_vocab([c for v in caps.values() for c in v] + concept_texts())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (OUT / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(OUT))
    cap_ids, cap_masks = [], []
    for c in CLASSES:
        enc = tokenizer(caps[c], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        assert int((enc["input_ids"] == tokenizer.unk_token_id).sum()) == 0
        cap_ids.append(enc["input_ids"])
        cap_masks.append(enc["attention_mask"])
    print(f"vocabulary {len(vocab)} tokens; captions per class {[len(caps[c]) for c in CLASSES]}")

    config = DemoClipConfig(image_size=IMAGE_SIZE, vocab_size=len(vocab), logit_scale_init=math.log(1 / 0.07))
    model = DemoClipModel(config)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 25) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS))
    )
    g = torch.Generator().manual_seed(SEED)
    by_class = [torch.nonzero(y == i).squeeze(1) for i in range(len(CLASSES))]
    model.train()
    for step in range(STEPS):
        cls = torch.randint(len(CLASSES), (BATCH,), generator=g)
        idx = torch.stack([by_class[c][torch.randint(len(by_class[c]), (1,), generator=g)][0] for c in cls.tolist()])
        which = [int(torch.randint(len(cap_ids[c]), (1,), generator=g)) for c in cls.tolist()]
        ids = torch.stack([cap_ids[c][w] for c, w in zip(cls.tolist(), which, strict=True)])
        mask = torch.stack([cap_masks[c][w] for c, w in zip(cls.tolist(), which, strict=True)])
        img = model.encode_image(augment(x[idx], g))[0]
        txt = model.encode_text(ids, mask)[0]
        loss = clip_loss(img, txt, model.logit_scale.exp(), cls)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == STEPS - 1:
            print(
                f"step {step:4d} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f} "
                f"({time.time() - t0:.0f} s)"
            )
    model.eval()
    report = evaluate(model, x_hold, hold_labels, tokenizer)
    print("held-out concept AUCs", {k: round(v, 4) for k, v in report["auc"].items()}, "accuracy", report["accuracy"])
    save(model, report, time.time() - t0, len(x))


TOKENIZER_CONFIG = {
    "tokenizer_class": "BertTokenizer",
    "do_lower_case": True,
    "model_max_length": CONTEXT,
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
AUTO_MAP = {
    "AutoConfig": "configuration_democlip.DemoClipConfig",
    "AutoModel": "modeling_democlip.DemoClipModel",
}


def save(model: DemoClipModel, report: dict, seconds: float, n_tiles: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(OUT / "model.safetensors"), metadata={"format": "pt"})
    c = model.config
    cfg = {
        "architectures": ["DemoClipModel"],
        "auto_map": AUTO_MAP,
        "model_type": "democlip",
        **{k: getattr(c, k) for k in ("image_size", "widths", "embed_dim", "vocab_size", "text_width")},
        **{k: getattr(c, k) for k in ("pad_token_id", "logit_scale_init")},
    }
    (OUT / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    proc = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }
    (OUT / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    log = {
        "script": "workflows/demo/train_demo_clip.py",
        "parameters": n_params,
        "training_tiles": n_tiles,
        "steps": STEPS,
        "batch": BATCH,
        "held_out": {
            "auc": {k: round(v, 4) for k, v in report["auc"].items()},
            "accuracy": round(report["accuracy"], 4),
        },
    }
    (OUT / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {OUT} ({n_params} parameters, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
