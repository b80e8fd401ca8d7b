"""Pictures of one slide's explanation: its attention heatmap beside heatmaps of its most enriched concepts, over
the plain slide thumbnail (mil/plots.attention_heatmap: the same colours and rank scaling), and crops of its
top-attention tiles read from the slide itself. PNGs under the task's explain folder, written atomically."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import PipelineError
from ..io.atomic import write_bytes_atomic
from ..io.zarr_access import attrs_dict
from ..layout import ResultsLayout
from ..mil.heatmaps import read_plain_thumbnail
from ..mil.plots import attention_heatmap  # also puts matplotlib on its file-only backend
from ..tiling.qc import write_png
from .profiles import SetProfile

log = logging.getLogger(__name__)

CROP_PX = 160  # side of a top-tile crop on the page (tiles are resized down, never up)
PANEL_IN = 3.4  # inches per heatmap panel
DPI = 110


@dataclass
class SlidePicture:
    """The plain thumbnail of a slide and how level-0 coordinates map onto it."""

    thumb: np.ndarray  # (H, W, 3) uint8 RGB
    level0_scale: float  # thumbnail px per level-0 px
    tile_size_level0: float
    tile_attrs: dict[str, Any]


def safe_name(text: str) -> str:
    """A file-name part from a concept set or slide name: letters, digits, '.', '_', '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


def load_slide_picture(layout: ResultsLayout, slide_id: str) -> SlidePicture:
    """Stage 1's plain thumbnail and tile geometry of a slide; one PipelineError line when they are missing."""
    import zarr

    store = layout.tile_store(slide_id)
    try:
        attrs = attrs_dict(zarr.open_group(str(store), mode="r"))
        width, tile = float(attrs["slide_dimensions"][0]), float(attrs["tile_size_level0"])
    except Exception as e:  # missing store or attributes: the slide must be tiled again
        raise PipelineError(
            f"{store}: cannot read the tile store ({type(e).__name__}: {e}); rerun `wsi-pipeline tile` for {slide_id}"
        ) from None
    thumb = read_plain_thumbnail(layout, slide_id)
    return SlidePicture(thumb, thumb.shape[1] / width, tile, attrs)


def heatmap_panels(
    picture: SlidePicture,
    coords: np.ndarray,
    weights: np.ndarray,
    profile: SetProfile,
    n_concepts: int,
    attention_label: str = "attention",
) -> list[tuple[str, np.ndarray]]:
    """(title, RGB image): attention, then the slide's n most enriched concepts of the set."""

    def heat(values: np.ndarray) -> np.ndarray:
        return attention_heatmap(picture.thumb, coords, picture.tile_size_level0, values, picture.level0_scale)

    panels = [(attention_label, heat(weights))]
    for j in profile.top_concepts(n_concepts):
        title = f"{profile.concepts[j]}\nenrichment {profile.enrichment[j]:+.3g}"
        panels.append((title, heat(profile.tile_scores[:, j])))
    return panels


def write_panels(path: Path, panels: list[tuple[str, np.ndarray]], title: str = "") -> None:
    """The panels side by side in one PNG (matplotlib, as mil/plots), written atomically."""
    import matplotlib.pyplot as plt

    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_IN * len(panels), PANEL_IN * h / w + 0.7), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels, strict=True):
        ax.imshow(image, interpolation="antialiased")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.05)  # no blank margins
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def write_slide_figures(
    picture: SlidePicture,
    slide_id: str,
    coords: np.ndarray,
    weights: np.ndarray,
    profiles: dict[str, SetProfile],
    n_concepts: int,
    out_dir: Path,
    attention_label: str = "attention",
) -> dict[str, str]:
    """Per concept set, `figures/{slide}__{set}.png` (attention + concept heatmaps); set -> path under out_dir."""
    written = {}
    for name, profile in profiles.items():
        rel = f"figures/{safe_name(slide_id)}__{safe_name(name)}.png"
        caption = f"{slide_id}: concept set {name} ({profile.score_kind}); colours rank tiles within the slide"
        panels = heatmap_panels(picture, coords, weights, profile, n_concepts, attention_label)
        write_panels(out_dir / rel, panels, caption)
        written[name] = rel
    return written


def write_tile_crops(
    picture: SlidePicture, slide_id: str, coords: np.ndarray, out_dir: Path
) -> tuple[list[str], str | None]:
    """`tiles/{slide}_{rank}.png` for each origin in `coords` (highest attention first), read from the slide with
    stage 1's geometry; a slide that cannot be read gives no crops and the reason (the rest of the page stands)."""
    from ..slide.reader import open_slide
    from ..tiling.geometry import geometry_from_attrs, read_tile

    attrs = picture.tile_attrs
    rels = [f"tiles/{safe_name(slide_id)}_{rank + 1:02d}.png" for rank in range(len(coords))]
    try:
        geometry = geometry_from_attrs(attrs)
        mpp = float(attrs["slide_mpp"]) if attrs.get("mpp_source") == "override" else None
        with open_slide(attrs["slide_path"], backend=attrs.get("backend", "auto"), mpp=mpp) as slide:
            crops = [read_tile(slide, (int(x), int(y)), geometry) for x, y in coords]
    except (PipelineError, OSError, KeyError) as e:
        reason = f"{attrs.get('slide_path', slide_id)}: cannot read tiles ({e})"
        log.warning("%s; the page shows no tile images for %s", reason, slide_id)
        return [], reason
    for rel, crop in zip(rels, crops, strict=True):
        if crop.shape[0] > CROP_PX:  # the page shows thumbnails of tiles: area-average down, never up
            crop = cv2.resize(crop, (CROP_PX, CROP_PX), interpolation=cv2.INTER_AREA)
        write_png(out_dir / rel, crop)
    return rels, None
