"""Slide ids: they name files, folders and Snakemake jobs, so one pattern and one rule serve every stage (the
workflow's wildcard too). Light on purpose: the Snakefile imports it."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

SLIDE_ID_PATTERN = r"[A-Za-z0-9._-]+"


def default_slide_id(path: str | os.PathLike[str]) -> str:
    """A valid slide id from the file name without its extension(s) (the folder name for a DICOM folder): letters
    other than ASCII lose their accents, and runs of other characters (spaces, brackets, ...) become one '_'."""
    p = Path(path)
    name = p.name if p.is_dir() else p.stem
    for suffix in (".ome.tiff", ".ome.tif"):
        if p.name.lower().endswith(suffix):
            name = p.name[: -len(suffix)]
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("_") or "slide"


def slide_id_problem(slide_id: str) -> str | None:
    """Why `slide_id` cannot name files and Snakemake jobs, or None when it can (the one rule for every stage)."""
    if not slide_id:
        return "empty slide id"
    if not re.fullmatch(SLIDE_ID_PATTERN, slide_id):
        return f"slide id {slide_id!r} has characters other than letters, digits, '.', '_', '-'"
    return None
