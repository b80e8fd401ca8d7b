"""The demo cohort: small SVS slides in two classes with survival data, built on :func:`write_synthetic_slide`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from .scene import mix
from .writers import write_synthetic_slide

# classes="texture": class 1 slides hold tumour (often beside necrosis), class 0 slides hold no tumour.
TUMOUR_COMPANIONS = ("necrosis", "stroma", "lymphocytes", "mucin")
BENIGN_TEXTURES = ("stroma", "lymphocytes", "adipose", "mucin")
DEMO_STAINS = ("he", "he_light", "he_dark")


def demo_textures(label: int, seed: int) -> tuple[tuple[str, str, str], str]:
    """(one texture per region, stain preset) of a texture-class demo slide, drawn from ``seed``.

    Class 1: tumour, then necrosis half the time, the rest from stroma / lymphocytes / mucin. Class 0: three of
    stroma, lymphocytes, adipose and mucin (never tumour or necrosis). Adipose, the palest texture, is kept off
    tumour slides: next to tumour it falls under the slide's Otsu tissue threshold, as fat does on real slides.
    Stains are drawn from he / he_light / he_dark in both classes, so colour alone does not tell them apart."""
    rng = np.random.default_rng([seed, 31])
    if label:
        companions = [t for t in TUMOUR_COMPANIONS if t != "necrosis"]
        first = "necrosis" if rng.uniform() < 0.5 else str(rng.choice(companions))
        second = str(rng.choice([t for t in companions if t != first]))
        picked = ["tumour", first, second]
    else:
        picked = [str(t) for t in rng.choice(BENIGN_TEXTURES, size=3, replace=False)]
    order = rng.permutation(3)
    textures = (picked[order[0]], picked[order[1]], picked[order[2]])
    return textures, str(rng.choice(DEMO_STAINS))


def write_demo_cohort(
    out_dir: str | Path,
    n_slides: int = 12,
    seed: int = 0,
    *,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.5,
    classes: Literal["stain", "texture"] = "stain",
):
    """Small SVS slides in two visibly different classes with survival data; returns the sample sheet.

    ``classes="stain"``: class 1 (high risk) has darker hematoxylin and ~3x the nuclei density. ``"texture"``:
    slides are drawn in named tissue textures (:func:`demo_textures`): class 1 holds a tumour region, class 0
    none; the ground truth (one row per region: slide_id, region, kind, x0, y0, x1, y1, texture, stain) is
    written to ``out_dir/textures.csv``.
    Either way class 1 has shorter survival (exponential, median ~3 months vs ~42), with uniform censoring;
    patients have 1-2 slides sharing label and outcome. The sheet (slide_id, path, patient_id, label, time,
    event) is also written to ``out_dir/samples.csv``."""
    import pandas as pd

    if classes not in ("stain", "texture"):
        raise ValueError(f"classes={classes!r}: use 'stain' or 'texture'")
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 2024])
    rows: list[dict] = []
    truth: list[dict] = []
    patient = 0
    while len(rows) < n_slides:
        label = patient % 2
        n = min(n_slides - len(rows), 1 + int(rng.uniform() < 0.4))
        t_death = rng.exponential(4.0 if label else 60.0)
        t_censor = rng.uniform(6.0, 72.0)
        time, event = round(max(0.5, min(t_death, t_censor)), 1), int(t_death <= t_censor)
        for _ in range(n):
            sid = f"demo_{len(rows):03d}"
            slide_seed = mix(seed, len(rows)) % 2**31
            if classes == "texture":
                textures, stain = demo_textures(label, slide_seed)
                kw: dict = {"textures": textures, "stain": stain}
            else:
                kw = {"stain": "he_dark" if label else "he", "nuclei_density": 2.0 if label else 0.6}
            spec = write_synthetic_slide(
                out / f"{sid}.svs", width=width, height=height, mpp=mpp, seed=slide_seed, jpeg_quality=60, **kw
            )
            for i, (r, tex) in enumerate(zip(spec.regions, spec.textures or [""] * len(spec.regions), strict=True)):
                if not tex:  # classes="stain": no named textures
                    continue
                truth.append(
                    {"slide_id": sid, "region": i, "kind": r.kind, "x0": r.x0, "y0": r.y0, "x1": r.x1, "y1": r.y1}
                    | {"texture": tex, "stain": spec.stain}
                )
            rows.append(
                {
                    "slide_id": sid,
                    "path": str(spec.path.resolve()),
                    "patient_id": f"P{patient:03d}",
                    "label": label,
                    "time": time,
                    "event": event,
                }
            )
        patient += 1
    sheet = pd.DataFrame(rows, columns=["slide_id", "path", "patient_id", "label", "time", "event"])
    sheet.to_csv(out / "samples.csv", index=False)
    if truth:
        pd.DataFrame(truth).to_csv(out / "textures.csv", index=False)
    return sheet
