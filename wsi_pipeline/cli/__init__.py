"""`wsi-pipeline`: the command line. Each verb does for one slide (or task) what its Snakemake rule does.

Command modules import only typer at load; each command imports its stage when it runs, so `wsi-pipeline tile`
never loads torch and `--help` is instant."""

from . import cohort, encode, explain, mil, tile  # noqa: F401  (each module adds its commands to `app`)
from .app import app

__all__ = ["app"]
