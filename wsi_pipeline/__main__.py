"""`python -m wsi_pipeline ...` is the `wsi-pipeline` command (workflow jobs use it: no PATH needed)."""

from .cli import app

app()
