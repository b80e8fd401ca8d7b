"""wsi_pipeline: whole-slide images in; tiles, ConceptCLIP embeddings, attention-MIL models and explanations out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
