"""The cohort report: one row per slide from the stage-1 and stage-2 sidecars, as CSV and HTML, and the short
failure summary printed at the end of a run."""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io.atomic import write_bytes_atomic
from ..io.faults import describe_os_error
from ..layout import STATUS_FAILED, STATUS_NO_TISSUE, STATUS_OK, ResultsLayout

log = logging.getLogger(__name__)

REPORT_COLUMNS = [
    "slide_id",
    "status",
    "reason",
    "backend",
    "vendor",
    "mpp",
    "mpp_source",
    "width",
    "height",
    "modality",
    "tissue_area_mm2",
    "n_tiles",
    "seconds",
    "encode_status",
    "encode_reason",
    "encode_tiles_per_s",
    "warnings",
    "thumbnail",
    "path",
]


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
        "modality": sidecar.get("modality"),
        "tissue_area_mm2": sidecar.get("tissue_area_mm2"),
        "n_tiles": sidecar.get("n_tiles", 0),
        "seconds": sidecar.get("seconds"),
        "encode_status": encode.get("status"),
        "encode_reason": encode.get("reason") or "",
        "encode_tiles_per_s": encode.get("tiles_per_s"),
        "warnings": "; ".join([*(sidecar.get("warnings") or []), *(encode.get("warnings") or [])]),
        "thumbnail": (sidecar.get("qc") or {}).get("thumbnail"),
        "path": sidecar.get("path"),
    }


def build_report(
    sidecars: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    encoder: str | None = None,
    *,
    results: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Write `report.csv` and `report.html` into `out_dir` from the tiling sidecars and, with `encoder`, the encode
    sidecars `features/{encoder}/{slide_id}.json` of `results` (default: `out_dir`, the results folder); returns
    the table.

    Reading needs no write access: when `out_dir` cannot be written (a finished cohort on a read-only share, a
    full disk) the table is still returned, one warning line says why the files were not written, and
    `table.attrs["not_written"]` holds that line."""
    out_dir = Path(out_dir)
    layout = ResultsLayout(results if results is not None else out_dir)
    rows = []
    for p in sidecars:
        tiles = json.loads(Path(p).read_text())
        enc_path = layout.feature_sidecar(encoder, tiles["slide_id"]) if encoder else None
        enc = json.loads(enc_path.read_text()) if enc_path is not None and enc_path.exists() else None
        rows.append(report_row(tiles, enc))
    table = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    out = ResultsLayout(out_dir)
    try:
        write_bytes_atomic(out.report_csv, table.to_csv(index=False).encode())
        write_bytes_atomic(out.report_html, _html(table, layout.root, out_dir).encode())
    except OSError as err:
        why = describe_os_error(err, out_dir, elsewhere="build the report from a writable copy of the folder")
        table.attrs["not_written"] = f"report.csv and report.html not written: {why}"
        log.warning("%s", table.attrs["not_written"])
    return table


def failure_summary(table: pd.DataFrame) -> str:
    """A short text for the end of a run: counts by status and one line per failed slide."""
    counts = table["status"].value_counts().to_dict()
    lines = [f"{len(table)} slides: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
    for _, row in table[table["status"] == STATUS_FAILED].iterrows():
        lines.append(f"  FAILED {row['slide_id']}: {row['reason']}")
    for _, row in table[table["encode_status"] == STATUS_FAILED].iterrows():
        lines.append(f"  ENCODE FAILED {row['slide_id']}: {row['encode_reason']}")
    if "warnings" in table:  # results to check by eye: not failures, never silent either
        for _, row in table[table["warnings"].fillna("").astype(str) != ""].iterrows():
            lines.append(f"  CHECK {row['slide_id']}: {row['warnings']}")
    return "\n".join(lines)


def _html(table: pd.DataFrame, results: Path, out_dir: Path) -> str:
    colours = {STATUS_OK: "#e6f4ea", STATUS_NO_TISSUE: "#fff8e1", STATUS_FAILED: "#fdecea"}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in REPORT_COLUMNS if c != "path")
    body = []
    for _, row in table.iterrows():
        cells = []
        for col in REPORT_COLUMNS:
            if col == "path":
                continue
            value = row[col]
            if col == "thumbnail" and isinstance(value, str) and value:
                # sidecars give the thumbnail relative to the results folder; the page may live elsewhere
                rel = os.path.relpath(value if os.path.isabs(value) else results / value, out_dir)
                # lazy: a cohort's page lists thousands of 2048-px thumbnails; the browser fetches those in view
                img = f'<img src="{html.escape(rel)}" height="120" loading="lazy">'
                cells.append(f'<td><a href="{html.escape(rel)}">{img}</a></td>')
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
