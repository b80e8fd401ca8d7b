"""The demo cohort: small SVS slides in two classes with survival data, built on :func:`write_synthetic_slide`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scene import mix
from .writers import write_synthetic_slide


def write_demo_cohort(
    out_dir: str | Path,
    n_slides: int = 12,
    seed: int = 0,
    *,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.5,
):
    """Small SVS slides in two visibly different classes with survival data; returns the sample sheet.

    Class 1 (high risk) has darker hematoxylin and ~3x the nuclei density, and shorter survival (exponential,
    median ~3 months vs ~42), with uniform censoring. Patients have 1-2 slides sharing label and outcome.
    The sheet (slide_id, path, patient_id, label, time, event) is also written to ``out_dir/samples.csv``."""
    import pandas as pd

    out = Path(out_dir)
    rng = np.random.default_rng([seed, 2024])
    rows: list[dict] = []
    patient = 0
    while len(rows) < n_slides:
        label = patient % 2
        n = min(n_slides - len(rows), 1 + int(rng.uniform() < 0.4))
        t_death = rng.exponential(4.0 if label else 60.0)
        t_censor = rng.uniform(6.0, 72.0)
        time, event = round(max(0.5, min(t_death, t_censor)), 1), int(t_death <= t_censor)
        for _ in range(n):
            sid = f"demo_{len(rows):03d}"
            spec = write_synthetic_slide(
                out / f"{sid}.svs",
                width=width,
                height=height,
                mpp=mpp,
                seed=mix(seed, len(rows)) % 2**31,
                stain="he_dark" if label else "he",
                nuclei_density=2.0 if label else 0.6,
                jpeg_quality=60,
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
    return sheet
