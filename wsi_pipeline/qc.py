"""Quality-control pictures per slide and the cohort report (CSV + HTML)."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

QC_MAX_SIDE = 2048  # longest side of a QC thumbnail, pixels
QC_FINEST_MPP = 2.0  # never draw QC finer than this: small slides get a readable picture, not a huge one

REPORT_COLUMNS = [
    "slide_id", "status", "reason", "backend", "vendor", "mpp", "mpp_source", "width", "height",
    "tissue_area_mm2", "n_tiles", "seconds", "encode_status", "encode_reason", "encode_tiles_per_s", "thumbnail",
    "path",
]


def qc_mpp_for(width: int, height: int, slide_mpp: float) -> float:
    """Resolution of the QC thumbnail: the whole slide fits in QC_MAX_SIDE pixels."""
    longest_um = max(width, height) * slide_mpp
    return max(longest_um / QC_MAX_SIDE, QC_FINEST_MPP)


def draw_qc_thumbnail(thumbnail: np.ndarray, level0_per_px: float, contours_level0: Iterable[np.ndarray],
                      coords: np.ndarray, tile_size_level0: float) -> np.ndarray:
    """The thumbnail with tissue contours (green) and the kept tile grid (blue boxes) drawn on it."""
    img = np.ascontiguousarray(thumbnail.copy())
    size = max(1, int(round(tile_size_level0 / level0_per_px)))
    if len(coords):
        xy = np.round(np.asarray(coords, dtype=np.float64) / level0_per_px).astype(np.int32)
        for x, y in xy:
            cv2.rectangle(img, (int(x), int(y)), (int(x) + size - 1, int(y) + size - 1), (40, 90, 230), 1)
    rings = [np.round(np.asarray(r, dtype=np.float64) / level0_per_px).astype(np.int32).reshape(-1, 1, 2)
             for r in contours_level0]
    if rings:
        cv2.polylines(img, rings, isClosed=True, color=(0, 170, 0), thickness=2)
    return img


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB (or single-channel) uint8 image as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", data)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def report_row(sidecar: dict[str, Any], encode: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report row from a slide's tiling sidecar (`tiles/{slide_id}.json`) and its encode sidecar, if any."""
    encode = encode or {}
    info = sidecar.get("slide") or {}
    dims = info.get("dimensions") or [None, None]
    return {
        "slide_id": sidecar["slide_id"],
        "status": sidecar["status"],
        "reason": sidecar.get("reason") or "",
        "backend": info.get("backend"),
        "vendor": info.get("vendor"),
        "mpp": info.get("mpp"),
        "mpp_source": info.get("mpp_source"),
        "width": dims[0],
        "height": dims[1],
        "tissue_area_mm2": sidecar.get("tissue_area_mm2"),
        "n_tiles": sidecar.get("n_tiles", 0),
        "seconds": sidecar.get("seconds"),
        "encode_status": encode.get("status"),
        "encode_reason": encode.get("reason") or "",
        "encode_tiles_per_s": encode.get("tiles_per_s"),
        "thumbnail": (sidecar.get("qc") or {}).get("thumbnail"),
        "path": sidecar.get("path"),
    }


def build_report(sidecars: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                 encoder: str | None = None) -> pd.DataFrame:
    """Write `report.csv` and `report.html` into `out_dir` (the results folder) from the tiling sidecars and, with
    `encoder`, the encode sidecars `features/{encoder}/{slide_id}.json`; returns the table."""
    out_dir = Path(out_dir)
    rows = []
    for p in sidecars:
        tiles = json.loads(Path(p).read_text())
        enc_path = out_dir / "features" / encoder / f"{tiles['slide_id']}.json" if encoder else None
        enc = json.loads(enc_path.read_text()) if enc_path is not None and enc_path.exists() else None
        rows.append(report_row(tiles, enc))
    table = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "report.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / "report.csv")
    (out_dir / "report.html").write_text(_html(table, out_dir))
    return table


def failure_summary(table: pd.DataFrame) -> str:
    """A short text for the end of a run: counts by status and one line per failed slide."""
    counts = table["status"].value_counts().to_dict()
    lines = [f"{len(table)} slides: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
    for _, row in table[table["status"] == "failed"].iterrows():
        lines.append(f"  FAILED {row['slide_id']}: {row['reason']}")
    for _, row in table[table["encode_status"] == "failed"].iterrows():
        lines.append(f"  ENCODE FAILED {row['slide_id']}: {row['encode_reason']}")
    return "\n".join(lines)


def _html(table: pd.DataFrame, out_dir: Path) -> str:
    colours = {"ok": "#e6f4ea", "no tissue": "#fff8e1", "failed": "#fdecea"}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in REPORT_COLUMNS if c != "path")
    body = []
    for _, row in table.iterrows():
        cells = []
        for col in REPORT_COLUMNS:
            if col == "path":
                continue
            value = row[col]
            if col == "thumbnail" and isinstance(value, str) and value:
                rel = os.path.relpath(value, out_dir) if os.path.isabs(value) else value
                cells.append(f'<td><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" height="120"></a></td>')
                continue
            if isinstance(value, float):
                text = "" if np.isnan(value) else f"{value:.4g}"
            else:
                text = "" if value is None else str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        colour = colours.get(str(row["status"]), "#ffffff")
        body.append(f'<tr style="background:{colour}">{"".join(cells)}</tr>')
    summary = html.escape(failure_summary(table)).replace("\n", "<br>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>wsi_pipeline tiling report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;font-size:13px}</style></head><body><h1>Tiling report</h1>"
        f"<p>{summary}</p><table><tr>{head}</tr>{''.join(body)}</table></body></html>\n"
    )
