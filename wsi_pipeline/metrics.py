"""Public metrics of the pipeline (re-exported from the MIL stage), e.g. `wsi_pipeline.metrics.c_index`."""

from .mil.metrics import (
    bootstrap_ci,
    c_index,
    classification_metrics,
    logrank_median_split,
    mean_se,
    survival_metrics,
)

__all__ = [
    "bootstrap_ci",
    "c_index",
    "classification_metrics",
    "logrank_median_split",
    "mean_se",
    "survival_metrics",
]
