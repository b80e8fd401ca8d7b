# Shared by every rule: the validated configuration (pydantic, one error line per problem) and the cohort table.
import sys
from pathlib import Path

from wsi_pipeline.config import load_config, write_run_config
from wsi_pipeline.devices import cuda_present

CFG = load_config(config)
COHORT = CFG.cohort()
SLIDES = list(COHORT.index)
# A changed sheet (labels, outcomes) must redo what reads it: stage 3 takes the sheet as an input.
SAMPLE_SHEET = [CFG.samples] if CFG.samples.lower().endswith(".csv") else []
RESULTS = Path(CFG.results)
# Shell jobs run the CLI with the interpreter running Snakemake (the project's venv), whatever PATH says.
WSI = f"{sys.executable} -m wsi_pipeline"


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

ENCODER = CFG.encoder.name
FEATURES = RESULTS / "features" / ENCODER
ENCODE_SHARDS = [f"{i}-of-{CFG.encode.jobs}" for i in range(CFG.encode.jobs)]


def _uses_gpu():
    if CFG.encode.device == "cpu":
        return False
    if CFG.encode.device == "auto":  # decided where the DAG is built: set encode.device: cuda on a cluster
        return cuda_present()  # without importing torch: every job re-reads this file
    return True


USE_GPU = _uses_gpu()

# The effective config after --configfile/--config overrides, for shell jobs to read (and as a record of the run).
RUN_CONFIG = write_run_config(CFG, RESULTS / "run_config.yaml")
