"""Regenerate the demo cohort's synthetic slides and sample sheet (deterministic; run from the repo root).

.venv/bin/python workflows/demo/make_demo.py
"""

from pathlib import Path

import pandas as pd

from wsi_pipeline.synthetic import write_demo_cohort

DEMO = Path(__file__).resolve().parent
slides = DEMO / "slides"
sheet = write_demo_cohort(slides, n_slides=20, seed=0, width=1536, height=1152)
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
