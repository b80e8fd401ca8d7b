"""One self-contained HTML page per task (`mil/{task}/explain/index.html`): the cohort concept table, then per slide
its label and prediction, its most enriched concepts as bars, attention and concept heatmaps and its top tiles with
their concepts. Plain HTML and inline CSS, no script; every text is escaped; pictures are relative links to the PNGs
beside the page (lazy-loaded), so the page stays light for a large cohort."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from ..io.atomic import write_bytes_atomic

CSS = """
body{font:14px/1.4 system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #ddd}
h3{font-size:16px;margin:0 0 4px}h4{font-size:14px;margin:10px 0 4px;color:#444}
.meta{color:#555;margin:2px 0}.note{color:#777;font-size:12px}
nav a{margin-right:8px;white-space:nowrap}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f3f3f3}
td.t,th.t{text-align:left}tr.sig td{background:#fff3b0;font-weight:600}
section.slide{border:1px solid #ccc;border-radius:6px;padding:12px 14px;margin:16px 0}
.facts span{display:inline-block;margin-right:14px}
.set{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.bars{min-width:330px}
.bar{display:grid;grid-template-columns:150px 150px 70px;gap:6px;align-items:center;font-size:12px;margin:2px 0}
.bar .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.track{position:relative;height:14px;background:#f1f1f1;border-radius:2px}
.track .zero{position:absolute;left:50%;top:0;bottom:0;border-left:1px solid #888}
.pos,.neg{position:absolute;top:2px;bottom:2px}.pos{left:50%;background:#d9534f}.neg{right:50%;background:#4a7bd0}
img.heat{max-width:100%;border:1px solid #ddd}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin-top:8px}
figure{margin:0;width:170px;font-size:11px}figure img{width:160px;height:160px;border:1px solid #bbb;display:block}
figcaption b{font-size:12px}.cap{font-style:italic;color:#444}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def link(rel: str) -> str:
    """A relative link to a file beside the page, URL-quoted and escaped."""
    return esc(quote(rel))


def fmt(value: Any, digits: int = 3) -> str:
    """A number for the page: `digits` significant figures, '–' for missing."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return esc(value)
    return "–" if math.isnan(x) else f"{x:.{digits}g}"


def bars(top: Sequence[dict[str, Any]], scale: float) -> str:
    """Enrichment bars of a slide's top concepts: red to the right of the zero line, blue to the left."""
    out = []
    for c in top:
        e = float(c["enrichment"])
        width = 0.0 if scale <= 0 else min(50.0, 50.0 * abs(e) / scale)
        out.append(
            f'<div class="bar"><span class="name" title="{esc(c["concept"])}">{esc(c["concept"])}</span>'
            f'<span class="track"><span class="zero"></span><span class="{"pos" if e >= 0 else "neg"}" '
            f'style="width:{width:.1f}%"></span></span><span>{e:+.3g}</span></div>'
        )
    return "".join(out)


def facts(record: dict[str, Any]) -> str:
    """The slide's label, prediction and fold, one line."""
    pred, parts = record.get("prediction") or {}, []
    if record.get("type") == "survival":
        parts += [f"time {fmt(record.get('time'))}", f"event {esc(record.get('event'))}"]
        parts.append(f"predicted risk {fmt(pred.get('risk'))} ({esc(pred.get('risk_group', ''))})")
    else:
        parts.append(f"label <b>{esc(record.get('label'))}</b>")
        probs = pred.get("probs") or {}
        p = probs.get(str(pred.get("class")))
        parts.append(f"predicted <b>{esc(pred.get('class'))}</b>" + (f" (p = {fmt(p)})" if p is not None else ""))
    fold = record.get("fold") or {}
    parts.append(f"fold {esc(fold.get('fold'))} (seed {esc(fold.get('seed'))})")
    parts.append(f"{esc(record.get('n_tiles'))} tiles")
    if record.get("patient_id") and record.get("patient_id") != record.get("slide_id"):
        parts.append(f"patient {esc(record['patient_id'])}")
    return '<p class="facts">' + "".join(f"<span>{p}</span>" for p in parts) + "</p>"


def tile_figures(record: dict[str, Any]) -> str:
    images = record.get("tile_images") or []
    out = []
    for i, tile in enumerate(record.get("top_tiles") or []):
        img = f'<img src="{link(images[i])}" alt="tile {tile["rank"]}" loading="lazy">' if i < len(images) else ""
        lines = [f"<b>#{tile['rank']}</b> weight {fmt(tile['attention'])}", f"at ({tile['x']}, {tile['y']})"]
        for concepts in (tile.get("concepts") or {}).values():
            lines.append(", ".join(f"{esc(c['concept'])} {fmt(c['score'], 2)}" for c in concepts))
        if tile.get("caption"):
            lines.append(f'<span class="cap">“{esc(tile["caption"])}”</span>')
        out.append(f"<figure>{img}<figcaption>{'<br>'.join(lines)}</figcaption></figure>")
    missing = record.get("tile_images_missing")
    note = f'<p class="note">no tile images: {esc(missing)}</p>' if missing else ""
    return note + '<div class="tiles">' + "".join(out) + "</div>"


def slide_section(record: dict[str, Any]) -> str:
    sid = str(record["slide_id"])
    parts = [f'<section class="slide" id="slide-{esc(sid)}"><h3>{esc(sid)}</h3>', facts(record)]
    figures = record.get("figures") or {}
    for name, prof in (record.get("concept_sets") or {}).items():
        scale = max((abs(float(e)) for e in prof.get("enrichment") or []), default=0.0)
        parts.append(f"<h4>{esc(name)} <span class='note'>(enrichment of {esc(prof.get('score'))})</span></h4>")
        parts.append(f'<div class="set"><div class="bars">{bars(prof.get("top_concepts") or [], scale)}</div>')
        if name in figures:
            parts.append(f'<img class="heat" src="{link(figures[name])}" alt="heatmaps {esc(name)}" loading="lazy">')
        parts.append("</div>")
    kind = f" <span class='note'>(weights: {esc(record['attention'])})</span>" if record.get("attention") else ""
    parts.append(f"<h4>top tiles{kind}</h4>" + tile_figures(record) + "</section>")
    return "".join(parts)


def concept_table_html(table: pd.DataFrame) -> str:
    """The cohort table, most significant first within each set and contrast; significant rows highlighted."""
    if table.empty:
        return '<p class="note">no concept statistics (no slides with concept scores)</p>'
    rows = table.sort_values(["concept_set", "contrast", "p"], kind="stable", na_position="last")
    head = (
        "<tr><th class='t'>concept set</th><th class='t'>contrast</th><th class='t'>concept</th><th>n A / B</th>"
        "<th>mean enrichment A</th><th>B</th><th>Cliff's δ</th><th>95% CI</th><th>p</th><th>q (BH)</th></tr>"
    )
    body = []
    for r in rows.itertuples(index=False):
        body.append(
            f"<tr class='{'sig' if bool(r.significant) else ''}'><td class='t'>{esc(r.concept_set)}</td>"
            f"<td class='t'>{esc(r.contrast)}</td><td class='t'>{esc(r.concept)}</td><td>{r.n_a} / {r.n_b}</td>"
            f"<td>{fmt(r.mean_a)}</td><td>{fmt(r.mean_b)}</td><td>{fmt(r.cliffs_delta, 2)}</td>"
            f"<td>[{fmt(r.ci_low, 2)}, {fmt(r.ci_high, 2)}]</td><td>{fmt(r.p, 2)}</td><td>{fmt(r.q, 2)}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def render_page(
    task: str, task_type: str, records: Iterable[dict[str, Any]], table: pd.DataFrame, meta: dict[str, Any]
) -> str:
    """The page as a string (no file access): `meta` holds encoder, concept_sets, fdr, bootstrap."""
    records = list(records)
    n_sig = int(table["significant"].sum()) if len(table) else 0
    sets = ", ".join(esc(s) for s in meta.get("concept_sets", []))
    unit = "patients" if task_type != "survival" else "patients, predicted high vs low risk (median split per fold)"
    nav = " ".join(f'<a href="#slide-{esc(r["slide_id"])}">{esc(r["slide_id"])}</a>' for r in records)
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(task)}: explanations</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>Task {esc(task)}: what the model looks at</h1>"
        f"<p class='meta'>{esc(task_type)} · {len(records)} slides · encoder {esc(meta.get('encoder', ''))} · "
        f"concept sets {sets}</p>"
        "<p class='note'>enrichment = attention-weighted concept score − the slide's mean score: &gt; 0 where the "
        "model looks. Heatmaps rank tiles within the slide (blue low, red high).</p>"
        f"<h2>Concepts that separate the groups</h2><p class='meta'>{n_sig} significant at FDR "
        f"{fmt(meta.get('fdr'))} (Mann-Whitney, Benjamini-Hochberg over the table); unit: {unit}; Cliff's δ &gt; 0: "
        f"higher enrichment in group A; CI: {esc(meta.get('bootstrap'))} bootstrap resamples.</p>"
        f"{concept_table_html(table)}<h2>Slides</h2><nav>{nav}</nav>"
        + "".join(slide_section(r) for r in records)
        + "</body></html>\n"
    )


def write_page(
    out_dir: Path,
    task: str,
    task_type: str,
    records: Iterable[dict[str, Any]],
    table: pd.DataFrame,
    meta: dict[str, Any],
) -> Path:
    """`out_dir/index.html`, written atomically."""
    path = Path(out_dir) / "index.html"
    write_bytes_atomic(path, render_page(task, task_type, records, table, meta).encode("utf-8"))
    return path
