"""Stage 4, tile concept scores: every tile's stored feature against every concept of a set, for a whole cohort.

    check = cohort_feature_check(results, cfg.encoder, slide_ids, emb)            # explain/feature_check.py
    table = score_cohort(results, cfg.encoder.name, slide_ids, emb, feature_check=check)

For each slide with a complete stage-2 store: `cosine` = cos(feature, concept embedding) (similarity.tile_cosine's
numbers) and, for sets of >= 2 concepts, `probs` = softmax over the set at the text tower's logit_scale, written to
`explain/{encoder}/{set}/{slide}.zarr` (explain/store.py's format, published atomically) with a JSON sidecar beside
it (ok / no tissue / skipped / failed, tiles, reason); the cohort's table goes to `explain/{encoder}/{set}/cohort.csv`.

Out of core and read-bound: features are `dask.array.from_zarr` arrays in row blocks aligned with the stores'
shards; each block is one matmul (similarity.cosine_block) and goes straight to the score store, so memory holds a few
blocks whatever the cohort's size. Slides are scored in windows of `WINDOW_SLIDES` in one threaded dask graph, so one
slide's reads overlap another's matmuls, and each slide is published the moment its blocks are written. A store is
reused when its attrs say it was computed from the same feature store (its `store_id` and `created` stamp), image
model, text model and prompts (the prompt hash) with the same feature-check outcome; `force` recomputes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import torch
import zarr

from .. import __version__
from ..encode.store import is_complete_store
from ..errors import FeatureError, PipelineError
from ..io import atomic
from ..io.faults import describe_os_error
from ..io.jsonio import read_json
from ..io.sidecar import Sidecar
from ..io.zarr_access import attrs_dict, zarr_array
from ..layout import STATUS_FAILED, STATUS_NO_TISSUE, STATUS_OK, STATUS_SKIPPED, ResultsLayout
from ..machine import usable_cpus
from .feature_check import NOT_CHECKED, FeatureCheck, image_model_key
from .similarity import check_same_model, cosine_block, softmax_block
from .store import ConceptScores, create_score_arrays, finished_attrs, is_complete_concept_store, write_concept_scores
from .text_cache import ConceptEmbeddings, text_model_key

log = logging.getLogger(__name__)

SCORE_FORMAT = 1  # bump when the numbers a store holds change meaning: every store is then recomputed
WINDOW_SLIDES = 64  # slides per dask graph: published as they finish; a failure redoes only this window's rest
SUMMARY_COLUMNS = ["slide_id", "status", "n_tiles", "reason", "reused"]


class ScoreSidecar(Sidecar):
    """`explain/{encoder}/{set}/{slide}.json`: what happened to one slide's concept scores."""

    slide_id: str
    encoder: str
    concept_set: str
    prompt_hash: str
    status: str = STATUS_FAILED
    reason: str = ""
    n_tiles: int = 0
    store: str | None = None  # relative to the results folder
    reused: bool = False
    feature_check: str = NOT_CHECKED
    package_version: str = ""


@dataclass
class _Job:
    """One slide to score: its feature store, where its scores go, and the attrs they will carry."""

    side: ScoreSidecar
    features: Path
    source: zarr.Group  # the feature store, open
    target: Path
    sidecar: Path
    n_tiles: int
    attrs: dict[str, Any]


def expected_attrs(feature_attrs: dict[str, Any], emb: ConceptEmbeddings, check: FeatureCheck) -> dict[str, Any]:
    """What a reusable score store's attrs must say: the same feature store, models, prompts and check outcome."""
    return {
        "score_format": SCORE_FORMAT,
        "prompt_hash": emb.prompt_hash,
        "concepts": list(emb.concepts),
        "text_model_key": text_model_key(emb.text_provenance),
        "image_model_key": image_model_key(feature_attrs.get("provenance") or {}),
        "feature_store_created": feature_attrs.get("created"),
        "feature_store_id": feature_attrs.get("store_id"),  # the very store read: a re-encode is a new one
        "feature_store_n_tiles": int(feature_attrs.get("n_tiles") or 0),
        "feature_check_status": check.status,
    }


def score_attrs(
    slide_id: str, feature_attrs: dict[str, Any], emb: ConceptEmbeddings, check: FeatureCheck, features_rel: str
) -> dict[str, Any]:
    """What a score store records: text side, image features, tile geometry, feature check, package version."""
    prov = feature_attrs.get("provenance") or {}
    image = {k: prov.get(k) for k in ("encoder", "model_id", "path", "revision", "weights_sha256", "preprocessing")}
    image.update({k: feature_attrs.get(k) for k in ("created", "dtype", "embed_dim")}, store=features_rel)
    return {
        **expected_attrs(feature_attrs, emb, check),
        **emb.provenance(),  # concept_set, prompt_hash, logit_scale, logit_bias, text_encoder
        "slide_id": slide_id,
        "image_features": image,
        "tile_geometry": feature_attrs.get("tile_geometry"),
        "coords_level": feature_attrs.get("coords_level", 0),
        "softmax": len(emb.concepts) >= 2,
        "feature_check": check.to_dict(),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def score_slide(
    results: str | Path,
    encoder_name: str,
    slide_id: str,
    embeddings: ConceptEmbeddings,
    *,
    chunk_rows: int = 16384,
    force: bool = False,
    feature_check: FeatureCheck | None = None,
) -> ScoreSidecar:
    """Score one slide (see `score_cohort`); never raises for a bad slide: the sidecar says what happened."""
    check = feature_check or FeatureCheck(NOT_CHECKED, reason="no feature check was run")
    check.require_aligned()
    with _one_torch_thread():
        return _score(ResultsLayout(results), encoder_name, [slide_id], embeddings, chunk_rows, force, check)[0]


def score_cohort(
    results: str | Path,
    encoder_name: str,
    slide_ids: Sequence[str],
    embeddings: ConceptEmbeddings,
    *,
    chunk_rows: int = 16384,
    force: bool = False,
    feature_check: FeatureCheck | None = None,
) -> pd.DataFrame:
    """Score every slide of `slide_ids` against one concept set (`embeddings`); one row per slide (slide_id, status,
    n_tiles, reason, reused), also written to `explain/{encoder}/{set}/cohort.csv`. A bad or missing slide is a row,
    not an error; a failed feature check (the stored features are not what the text side expects) is one
    FeatureError line before anything is written."""
    check = feature_check or FeatureCheck(NOT_CHECKED, reason="no feature check was run")
    check.require_aligned()
    layout = ResultsLayout(results)
    started = time.perf_counter()
    with _one_torch_thread():
        sides = _score(layout, encoder_name, list(slide_ids), embeddings, chunk_rows, force, check)
    table = pd.DataFrame([{c: getattr(s, c) for c in SUMMARY_COLUMNS} for s in sides], columns=SUMMARY_COLUMNS)
    summary = layout.concept_summary(encoder_name, embeddings.concept_set)
    atomic.write_bytes_atomic(summary, table.to_csv(index=False).encode())
    scored = [s for s in sides if s.status == STATUS_OK and not s.reused]
    tiles, seconds = sum(s.n_tiles for s in scored), time.perf_counter() - started
    counts = table["status"].value_counts().to_dict()
    log.info(
        "concept set %s: %d slides scored (%d tiles, %.0f tiles/s), %d reused; statuses %s",
        *(embeddings.concept_set, len(scored), tiles, tiles / max(seconds, 1e-9), int(table["reused"].sum()), counts),
    )
    return table


def _score(
    layout: ResultsLayout,
    encoder: str,
    slide_ids: list[str],
    emb: ConceptEmbeddings,
    chunk_rows: int,
    force: bool,
    check: FeatureCheck,
) -> list[ScoreSidecar]:
    sides: dict[str, ScoreSidecar] = {}
    jobs: list[_Job] = []
    for sid in dict.fromkeys(slide_ids):  # a slide listed twice is scored once
        planned = _plan(layout, encoder, sid, emb, check, force)
        if isinstance(planned, _Job):
            jobs.append(planned)
        sides[sid] = planned.side if isinstance(planned, _Job) else planned
    for i in range(0, len(jobs), WINDOW_SLIDES):
        _run_window(jobs[i : i + WINDOW_SLIDES], emb, chunk_rows)  # writes each slide's sidecar
    return [sides[sid] for sid in slide_ids]


def _plan(
    layout: ResultsLayout, encoder: str, sid: str, emb: ConceptEmbeddings, check: FeatureCheck, force: bool
) -> _Job | ScoreSidecar:
    """A job for a slide to score; or its finished sidecar (reused, skipped, no tissue, refused), already written."""
    side = ScoreSidecar(
        slide_id=sid,
        encoder=encoder,
        concept_set=emb.concept_set,
        prompt_hash=emb.prompt_hash,
        feature_check=check.status,
        package_version=__version__,
    )
    features = layout.feature_store(encoder, sid)
    target = layout.concept_store(encoder, emb.concept_set, sid)
    try:
        if not is_complete_store(features):
            side.status, side.reason = STATUS_SKIPPED, _why_no_features(layout, encoder, sid, features)
            return _written(layout, side)
        source = zarr.open_group(str(features), mode="r", zarr_format=3)  # stage 2 writes v3: no probing for v2
        attrs = attrs_dict(source)
        check_same_model(attrs, emb.text_provenance, features)
        if int(attrs.get("embed_dim") or emb.dim) != emb.dim:
            raise FeatureError(
                f"{features}: features are {attrs.get('embed_dim')}-d but the text embeddings of concept set "
                f"{emb.concept_set!r} are {emb.dim}-d; encode with the model whose text tower embeds the concepts"
            )
        side.n_tiles = n = int(attrs["n_tiles"])
        side.store = layout.rel(target)
        if not force and is_complete_concept_store(target, expected_attrs(attrs, emb, check)):
            side.status, side.reused = (STATUS_OK if n else STATUS_NO_TISSUE), True
            return _written(layout, side)
        sidecar = layout.concept_sidecar(encoder, emb.concept_set, sid)
        job_attrs = score_attrs(sid, attrs, emb, check, layout.rel(features))
        job = _Job(side, features, source, target, sidecar, n, job_attrs)
        if n == 0:  # nothing to read: the empty store is written at once
            empty = np.zeros((0, len(emb.concepts)), np.float32)
            probs = empty if len(emb.concepts) >= 2 else None
            scores = ConceptScores(list(emb.concepts), empty, np.zeros((0, 2), np.int64), probs, job.attrs)
            write_concept_scores(target, scores)
            side.status, side.reason = STATUS_NO_TISSUE, "stage 1 found no tissue (0 tiles): empty store written"
            return _written(layout, side)
        return job
    except PipelineError as err:  # refused (another model, other width) or unreadable: this slide fails
        side.status, side.reason = STATUS_FAILED, str(err)
    except OSError as err:
        side.status, side.reason = STATUS_FAILED, describe_os_error(err, target.parent)
    return _written(layout, side)


def _written(layout: ResultsLayout, side: ScoreSidecar) -> ScoreSidecar:
    side.write(layout.concept_sidecar(side.encoder, side.concept_set, side.slide_id))
    return side


def _why_no_features(layout: ResultsLayout, encoder: str, sid: str, store: Path) -> str:
    sidecar = layout.feature_sidecar(encoder, sid)
    said = ""
    with contextlib.suppress(OSError, ValueError):  # no sidecar, or a damaged one: the store's state says enough
        meta = read_json(sidecar)
        said = f" (stage 2: {meta.get('status')}{': ' + meta['reason'] if meta.get('reason') else ''})"
    return f"{store}: no complete feature store{said}; run `wsi-pipeline encode` for this slide first"


def block_rows(features: zarr.Array, chunk_rows: int) -> int:
    """Rows per dask block: `chunk_rows` rounded down to whole shards (or whole chunks below a shard), so every block
    decodes whole chunks once; smaller than one chunk only when asked for."""
    inner = int(features.chunks[0])
    outer = int((features.shards or features.chunks)[0])
    step = outer if chunk_rows >= outer else inner if chunk_rows >= inner else 1
    return max(1, chunk_rows // step * step)


def _run_window(jobs: list[_Job], emb: ConceptEmbeddings, chunk_rows: int) -> None:
    """Score `jobs` as one dask array: the slides' feature stores (`from_zarr`, blocks aligned with their shards)
    concatenated, one task per block (cosine, softmax, write) on a thread per core, each slide published by the task
    that writes its last rows. A failed block (NaN features, a damaged chunk) stops the graph; the slides not yet
    published are then redone one by one, so the failure lands on its slide alone."""
    for folder in {job.target.parent for job in jobs}:
        atomic.remove_stale_temporaries_in(folder)  # left by killed runs (their writer is gone)
    sinks, feats, coords, uid = [], [], [], uuid.uuid4().hex
    pool = ThreadPoolExecutor(usable_cpus(), thread_name_prefix="concept-scores")
    try:
        for i, job in enumerate(jobs):
            f, xy = zarr_array(job.source, "features"), zarr_array(job.source, "coords")
            rows = block_rows(f, chunk_rows)
            # named keys: dask would otherwise hash every argument of every task, which costs more than the math
            feats.append(da.from_zarr(f, chunks=(rows, f.shape[1]), name=f"features-{uid}-{i}"))
            coords.append(da.from_zarr(xy, chunks=(rows, 2), name=f"coords-{uid}-{i}"))
            sinks.append(_Sink(job, atomic.temporary_name(job.target), rows, list(emb.concepts)))
        x, xy = da.concatenate(feats), da.concatenate(coords)
        starts = np.cumsum([0] + [job.n_tiles for job in jobs])
        text_t = np.ascontiguousarray(emb.embeddings.T, dtype=np.float32)
        scored = da.map_blocks(
            _score_block,
            x,
            xy,
            dtype=np.int8,
            chunks=(x.chunks[0], (1,)),
            name=f"scores-{uid}",
            text_t=text_t,
            sinks=_Opaque(sinks),
            starts=starts,
            softmax=(emb.logit_scale, emb.logit_bias) if len(emb.concepts) >= 2 else None,
        )
        scored.compute(scheduler="threads", pool=pool)
    except Exception as err:  # noqa: BLE001 - any failure is pinned on its slide below, one line each
        pool.shutdown(wait=True)  # blocks still running write into the temporaries: let them end first
        atomic.settle_zarr_writes()
        for sink in sinks:
            shutil.rmtree(sink.tmp, ignore_errors=True)  # published ones were renamed away: nothing to remove
        for job in jobs:
            if job.side.status == STATUS_OK:
                continue  # published before the failure
            if len(jobs) == 1:
                _fail(job, err)
            else:
                _run_window([job], emb, chunk_rows)
    finally:
        pool.shutdown(wait=True)


def _fail(job: _Job, err: BaseException) -> None:
    job.side.status, job.side.store = STATUS_FAILED, None
    if isinstance(err, PipelineError):
        job.side.reason = str(err)
    elif isinstance(err, OSError):
        job.side.reason = describe_os_error(err, job.target.parent)
    else:
        job.side.reason = f"{job.features}: cannot score the features ({type(err).__name__}: {err})"
    job.side.write(job.sidecar)
    log.info("%s: failed: %s", job.side.slide_id, job.side.reason)


class _Opaque:
    """Hides Python objects from dask, which would otherwise walk them (zarr's nested metadata) at graph build."""

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass
class _Sink:
    """One slide's temporary score store: created by the first of its blocks, published by the one that completes it."""

    job: _Job
    tmp: Path
    rows: int  # rows per block = per chunk of the score arrays, so blocks never share a chunk
    concepts: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrays: dict[str, Any] = field(default_factory=dict)
    written: int = 0

    def write(self, first_row: int, values: dict[str, np.ndarray]) -> None:
        n = len(values["cosine"])
        with self.lock:
            if not self.arrays:  # the finished attrs at once: a temporary is never read, and it saves a write
                attrs = finished_attrs(self.job.attrs, self.concepts, self.job.n_tiles)
                group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3, attributes=attrs)
                c = len(self.concepts)
                self.arrays = create_score_arrays(group, self.job.n_tiles, c, self.rows, probs=c >= 2)
        for name, v in values.items():
            self.arrays[name][first_row : first_row + n] = v
        with self.lock:
            self.written += n
            complete = self.written == self.job.n_tiles
        if complete:
            atomic.publish(self.tmp, self.job.target, overwrite=True)
            self.job.side.status, self.job.side.reason = STATUS_OK, ""
            self.job.side.write(self.job.sidecar)


def _score_block(
    block: np.ndarray,
    coords: np.ndarray,
    text_t: np.ndarray,
    sinks: _Opaque,
    starts: np.ndarray,
    softmax: tuple[float, float | None] | None,
    block_info: Any = None,
) -> np.ndarray:
    """One block of one slide: cosine (one matmul), softmax, both written with the coords into the slide's store."""
    at = int(block_info[0]["array-location"][0][0])
    i = int(np.searchsorted(starts, at, side="right")) - 1
    sink: _Sink = sinks.value[i]
    first = at - int(starts[i])
    cos = cosine_block(block, text_t, str(sink.job.features), first_row=first)
    values = {"cosine": cos, "coords": coords}
    if softmax is not None:
        values["probs"] = softmax_block(cos, *softmax)
    sink.write(first, values)
    return np.zeros((len(block), 1), np.int8)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch thread per block: dask's threads run blocks side by side; torch's own pool would oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
