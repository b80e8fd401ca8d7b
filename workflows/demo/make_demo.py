"""Regenerate the demo cohort's synthetic slides and sample sheet (deterministic; run from the repo root).

.venv/bin/python workflows/demo/make_demo.py

Classes are defined by tissue texture: class 1 slides hold a tumour region, class 0 slides none (see
wsi_pipeline.synthetic.demo.demo_textures); slides/textures.csv records every region's geometry and texture.
"""

from pathlib import Path

import pandas as pd

from wsi_pipeline.synthetic import write_demo_cohort

DEMO = Path(__file__).resolve().parent
slides = DEMO / "slides"
sheet = write_demo_cohort(slides, n_slides=20, seed=0, width=1536, height=1152, classes="texture")
(slides / "samples.csv").unlink()
sheet["path"] = [f"slides/{Path(p).name}" for p in sheet["path"]]
cmu = pd.DataFrame(
    [
        {
            "slide_id": "cmu-1-small-region",
            "path": "slides/cmu-1-small-region.svs",
            "patient_id": "CMU1",
            "label": "",
            "time": "",
            "event": "",
        }
    ]
)
pd.concat([cmu, sheet], ignore_index=True).to_csv(DEMO / "samples.csv", index=False)
