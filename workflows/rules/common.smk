# Shared by every rule: the validated configuration (pydantic, one error line per problem) and the cohort table.
from pathlib import Path

from wsi_pipeline.config import load_config

CFG = load_config(config)
COHORT = CFG.cohort()
SLIDES = list(COHORT.index)
RESULTS = Path(CFG.results)


wildcard_constraints:
    slide_id="[A-Za-z0-9._-]+",


def slide_path(wildcards):
    return COHORT.loc[wildcards.slide_id, "path"]


def slide_input(wildcards):
    """The slide as input when it exists; a missing file is still tiled, so its failure lands in the report."""
    path = Path(slide_path(wildcards))
    return [str(path)] if path.exists() else []


def slide_mpp(wildcards):
    value = COHORT.loc[wildcards.slide_id, "mpp"]
    return None if value != value else float(value)  # NaN -> None
