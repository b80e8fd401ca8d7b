"""wsi_pipeline: whole-slide images in; tiles, ConceptCLIP embeddings, attention-MIL models and explanations out."""

# The one place the version lives (pyproject.toml reads it from here): a literal, so a tile job reads it without
# importlib.metadata (~35 ms of start-up per job).
__version__ = "0.1.0"

__all__ = ["__version__"]
