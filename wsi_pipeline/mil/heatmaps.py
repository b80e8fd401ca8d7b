"""Attention heatmaps of a trained task: per slide, attention over the plain thumbnail and a gallery of its
top-attention tiles (PNGs), with `heatmaps/index.json` listing them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io.jsonio import write_json_atomic
from ..layout import ResultsLayout


def rank01(scores: np.ndarray) -> np.ndarray:
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    return ranks / max(len(scores) - 1, 1)


def read_plain_thumbnail(layout: ResultsLayout, slide_id: str) -> np.ndarray:
    """The slide's plain QC thumbnail (RGB), the base of every heatmap; a slide tiled by an earlier version has only
    the QC thumbnail with its drawings. An unreadable one is one PipelineError line."""
    import cv2

    from ..errors import PipelineError

    path = layout.qc_dir(slide_id) / "thumbnail_plain.png"
    if not path.exists():
        path = path.with_name("thumbnail.png")
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise PipelineError(f"{path}: cannot read the slide thumbnail; rerun `wsi-pipeline tile` for {slide_id}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def tested_slides(task_dir: Path) -> set[str] | None:
    """The slides the task's current folds tested (every seed): the only ones whose attention belongs to it now.
    None where the folds do not list their slides (nothing is then removed)."""
    import pandas as pd

    slides: set[str] = set()
    for path in task_dir.glob("fold*/predictions.csv"):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "slide_ids" not in table.columns:
            return None
        slides.update(s for cell in table["slide_ids"] for s in cell.split(";") if s)
    return slides


def remove_untested(layout: ResultsLayout, task: str) -> list[str]:
    """Attention stores of slides the task no longer tests (removed from the sheet, or from a fold since): a
    retrained task never shows attention of an earlier training."""
    import shutil

    from ..io.atomic import is_temporary

    current = tested_slides(layout.task_dir(task))
    att_dir = layout.attention_dir(task)
    if current is None or not att_dir.is_dir():
        return []
    gone = [p for p in att_dir.glob("*.zarr") if not is_temporary(p) and p.name[: -len(".zarr")] not in current]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name[: -len(".zarr")] for p in gone)


def write_heatmaps(results: Path, task: str, top_k: int) -> dict[str, Any]:
    """Per slide the task tests: heatmap over the plain slide thumbnail and a gallery of the top-k tiles (PNGs);
    attention and pictures of slides it no longer tests are removed."""
    import zarr

    from ..io.atomic import is_temporary
    from ..io.zarr_access import attrs_dict, read_array
    from ..slide.reader import open_slide
    from ..tiling.geometry import geometry_from_attrs, read_tile
    from ..tiling.qc import write_png
    from .plots import attention_heatmap

    layout = ResultsLayout(results)
    out = layout.heatmap_dir(task)
    remove_untested(layout, task)
    written = {}
    pictures: set[str] = set()
    for att_path in sorted(p for p in layout.attention_dir(task).glob("*.zarr") if not is_temporary(p)):
        sid = att_path.stem
        att = zarr.open_group(str(att_path), mode="r")
        scores = read_array(att, "scores").astype(np.float64, copy=False)
        tiles = zarr.open_group(str(layout.tile_store(sid)), mode="r")
        attrs = attrs_dict(tiles)
        coords = read_array(att, "coords") if "coords" in att else read_array(tiles, "coords")
        thumb = read_plain_thumbnail(layout, sid)
        scale = thumb.shape[1] / float(attrs["slide_dimensions"][0])  # thumbnail px per level-0 px
        heat = attention_heatmap(thumb, coords, float(attrs["tile_size_level0"]), scores, scale)
        write_png(out / f"{sid}_heatmap.png", heat)
        entry = {"heatmap": str(out / f"{sid}_heatmap.png"), "n_tiles": int(len(scores))}
        pictures.add(f"{sid}_heatmap.png")
        if top_k and len(scores):
            geometry = geometry_from_attrs(attrs)
            mpp = float(attrs["slide_mpp"]) if attrs.get("mpp_source") == "override" else None
            order = np.argsort(-scores, kind="stable")[:top_k]
            with open_slide(attrs["slide_path"], backend=attrs.get("backend", "auto"), mpp=mpp) as slide:
                gallery = [read_tile(slide, coords[i], geometry) for i in order]
            write_png(out / f"{sid}_top{len(order)}.png", np.concatenate(gallery, axis=1))
            pictures.add(f"{sid}_top{len(order)}.png")
            entry["top_tiles"] = coords[order].tolist()
            entry["top_scores_rank01"] = rank01(scores)[order].round(4).tolist()
        written[sid] = entry
    for png in out.glob("*.png") if out.is_dir() else []:
        if png.name not in pictures:
            png.unlink(missing_ok=True)
    write_json_atomic(out / "index.json", written)
    return written
