"""wsi_pipeline: whole-slide images in; tiles, ConceptCLIP embeddings, attention-MIL models and explanations out."""

from __future__ import annotations

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    # The version is read from the installed distribution's metadata on first use: importlib.metadata costs
    # ~35 ms, which every tile job of a cohort would otherwise pay at start-up.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("wsi-pipeline")
        except PackageNotFoundError:  # running from a source tree that was not installed
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
