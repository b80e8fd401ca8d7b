"""The stage-1 sidecar `tiles/{slide_id}.json` as a typed model: what happened to a slide, written always."""

from __future__ import annotations

from typing import Any

from ..io.sidecar import Sidecar


class TileSidecar(Sidecar):
    """Status ("ok", "no tissue" or "failed") with the reason, the slide's metadata, geometry, outputs, time."""

    slide_id: str
    path: str
    status: str = "failed"
    reason: str = ""
    n_tiles: int = 0
    package_version: str
    tiling: dict[str, Any]
    tissue_params: dict[str, Any]
    mpp_override: float | None = None
    slide_fingerprint: dict[str, Any] | None = None  # slide.fingerprint: is the file still the one that was tiled?
    slide: dict[str, Any] | None = None  # SlideInfo.to_dict(): backend, vendor, dimensions, MPP and its source
    tissue_area_mm2: float | None = None
    modality: str | None = None  # brightfield or fluorescence (tissue.modality, or detected)
    background_rgb: list[int] | None = None  # median colour of the glass (brightfield)
    warnings: list[str] = []  # results to check by eye (e.g. strongly coloured glass); not failures
    geometry: dict[str, Any] | None = None  # TileGeometry.to_dict()
    store: str | None = None  # relative to the results folder
    qc: dict[str, str] | None = None  # QC picture paths, relative to the results folder
    seconds: float | None = None
