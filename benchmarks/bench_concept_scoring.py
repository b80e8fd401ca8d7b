"""Stage 4 tile concept scoring: the cohort scorer's rate against a plain read of the same feature stores.

    .venv/bin/python benchmarks/bench_concept_scoring.py                          # scaled down: 100 x 10,000 tiles
    .venv/bin/python benchmarks/bench_concept_scoring.py --slides 1000 --tiles 10000 --concepts 100   # the issue's

Feature stores are written once in stage 2's layout (encode/store.py: fp16, sharded, zstd) with random features
(`--workdir` keeps them for the next run; the issue's size is 23 GB). Each round times, on the same stores:
  read   a plain read: the scorer's own dask graph shape (from_zarr blocks aligned with the shards, WINDOW_SLIDES slides
         per graph, one thread per usable core), every block read and dropped;
  score  `score_cohort`: read, one matmul + softmax per block, score stores written and published, sidecars,
         cohort.csv (the last round's outputs are removed first, untimed: every round scores from scratch).
Passes alternate, each after evicting the stores from the page cache (posix_fadvise DONTNEED; `--warm` keeps them).
Also measured, one thing at a time: CPU seconds per slide to read, to do the scoring arithmetic (blocks already in
memory) and to write the scores: when reading is CPU-bound too (decompression from a fast disk, or from the host's
cache behind a VM's disk), score/read cannot beat read / (read + arithmetic + write).
Goal (issue 10): score rate >= 0.8 x read rate.
Prints a table and writes benchmarks/results/concept_scoring_{host}.json with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from wsi_pipeline.encode.store import create_feature_arrays, is_complete_store, plan_layout  # noqa: E402
from wsi_pipeline.explain.scores import WINDOW_SLIDES, block_rows, score_cohort  # noqa: E402
from wsi_pipeline.explain.similarity import cosine_block, softmax_block  # noqa: E402
from wsi_pipeline.explain.store import create_score_arrays  # noqa: E402
from wsi_pipeline.explain.text_cache import ConceptEmbeddings  # noqa: E402
from wsi_pipeline.io.atomic import atomic_group  # noqa: E402
from wsi_pipeline.io.zarr_access import zarr_array  # noqa: E402
from wsi_pipeline.layout import ResultsLayout  # noqa: E402
from wsi_pipeline.machine import usable_cpus  # noqa: E402

ENCODER = "bench"
PROVENANCE = {"encoder": ENCODER, "model_id": None, "revision": None, "weights_sha256": None}


def write_stores(results: Path, n_slides: int, tiles: int, dim: int, seed: int = 0) -> list[str]:
    """Stage-2 feature stores of random fp16 features, one slide at a time; complete ones are kept."""
    layout, ids = ResultsLayout(results), []
    rng = np.random.default_rng(seed)
    xy = np.stack([np.arange(tiles) % 100, np.arange(tiles) // 100], axis=1)  # a 100-wide grid
    for i in range(n_slides):
        sid = f"slide{i:04d}"
        ids.append(sid)
        path = layout.feature_store(ENCODER, sid)
        if is_complete_store(path, {"embed_dim": dim, "n_tiles": tiles}):
            continue
        feats = rng.standard_normal((tiles, dim), dtype=np.float32).astype(np.float16)
        with atomic_group(path) as g:
            f, c = create_feature_arrays(g, tiles, dim, "float16", plan_layout(tiles, dim))
            f[:] = feats
            c[:] = (xy * 256).astype(np.int64)
            g.attrs.update(
                {
                    "encoder": ENCODER,
                    "provenance": PROVENANCE,
                    "embed_dim": dim,
                    "dtype": "float16",
                    "n_tiles": tiles,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "complete": True,
                }
            )
    return ids


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (Linux)


def rss_mb(field: str) -> float:
    """VmHWM (peak since the last reset) or VmRSS of this process, in MB."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith(field))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evict(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (no root needed for files we can open)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _first_column(block: np.ndarray) -> np.ndarray:
    return block[:, :1].copy()  # the block was decoded; keep one column so nothing big is concatenated


def plain_read(results: Path, slide_ids: list[str], chunk_rows: int) -> None:
    """Read every feature block of every slide, as the scorer's graph does, and drop it."""
    layout = ResultsLayout(results)
    with ThreadPoolExecutor(usable_cpus()) as pool:
        for i in range(0, len(slide_ids), WINDOW_SLIDES):
            graphs = []
            for sid in slide_ids[i : i + WINDOW_SLIDES]:
                arr = zarr_array(zarr.open_group(str(layout.feature_store(ENCODER, sid)), mode="r"), "features")
                x = da.from_zarr(arr, chunks=(block_rows(arr, chunk_rows), arr.shape[1]))
                graphs.append(x.map_blocks(_first_column, chunks=(x.chunks[0], (1,)), dtype=x.dtype))
            dask.compute(*graphs, scheduler="threads", pool=pool)


def core_seconds(results: Path, slide_ids: list[str], emb: ConceptEmbeddings, chunk_rows: int) -> dict[str, float]:
    """Per slide, one thing at a time: CPU seconds (all threads) to read its features, to score them in memory, and
    to write the scores (a score store: group, arrays, chunks)."""
    layout = ResultsLayout(results)
    text_t = np.ascontiguousarray(emb.embeddings.T)
    read, compute, write = [], [], []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=results) as scratch:
        for sid in slide_ids[:4]:
            source = zarr.open_group(str(layout.feature_store(ENCODER, sid)), mode="r")
            arr, xy = zarr_array(source, "features"), zarr_array(source, "coords")
            rows = block_rows(arr, chunk_rows)
            t = time.process_time()
            starts = range(0, arr.shape[0], rows)
            blocks = [(np.asarray(arr[i : i + rows]), np.asarray(xy[i : i + rows])) for i in starts]
            read.append(time.process_time() - t)
            t = time.process_time()
            scored = [(cosine_block(b, text_t), c) for b, c in blocks]
            scored = [(cos, softmax_block(cos, emb.logit_scale, emb.logit_bias), c) for cos, c in scored]
            compute.append(time.process_time() - t)
            t = time.process_time()
            group = zarr.open_group(f"{scratch}/{sid}.zarr", mode="w", zarr_format=3)
            out = create_score_arrays(group, arr.shape[0], len(emb.concepts), rows, probs=True)
            for i, (cos, probs, c) in enumerate(scored):
                out["cosine"][i * rows : i * rows + len(cos)] = cos
                out["probs"][i * rows : i * rows + len(cos)] = probs
                out["coords"][i * rows : i * rows + len(cos)] = c
            write.append(time.process_time() - t)
    torch.set_num_threads(usable_cpus())
    return {
        "read_core_s_per_slide": statistics.median(read),
        "score_core_s_per_slide": statistics.median(compute),
        "write_core_s_per_slide": statistics.median(write),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--chunk-rows", type=int, default=16384, help="explain.chunk_rows")
    ap.add_argument("--rounds", type=int, default=3, help="read/score pairs, alternating")
    ap.add_argument("--warm", action="store_true", help="keep the stores in the page cache between passes")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the feature stores here for the next run")
    ap.add_argument("--name", default="concept_scoring", help="results file: benchmarks/results/{name}_{host}.json")
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="concept_scoring_"))
    results = root / "results"
    try:
        t0 = time.perf_counter()
        ids = write_stores(results, args.slides, args.tiles, args.dim)
        write_s = time.perf_counter() - t0
        features_dir = ResultsLayout(results).feature_dir(ENCODER)
        stores = [ResultsLayout(results).feature_store(ENCODER, sid) for sid in ids]
        disk = sum(f.stat().st_size for store in stores for f in store.rglob("*") if f.is_file())
        rng = np.random.default_rng(1)
        text = rng.standard_normal((args.concepts, args.dim)).astype(np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        emb = ConceptEmbeddings(
            "bench", [f"c{i}" for i in range(args.concepts)], text, "bench", 100.0, None, dict(PROVENANCE)
        )
        n_tiles, raw_gb = args.slides * args.tiles, args.slides * args.tiles * args.dim * 2 / 1e9
        load_before = os.getloadavg()  # other jobs on the machine take cores from both passes
        rows: list[dict[str, Any]] = []
        score_cohort(results, ENCODER, ids[:1], emb, chunk_rows=args.chunk_rows, force=True)  # imports, untimed
        base_rss = rss_mb("VmRSS")
        for r in range(args.rounds):
            for name, run in (
                ("read", lambda: plain_read(results, ids, args.chunk_rows)),
                ("score", lambda: score_cohort(results, ENCODER, ids, emb, chunk_rows=args.chunk_rows, force=True)),
            ):
                if name == "score":  # a first scoring, not a replacement of the last round's stores
                    shutil.rmtree(results / "explain", ignore_errors=True)
                if not args.warm:
                    evict(features_dir)
                reset_peak_rss()
                t = time.perf_counter()
                run()
                s = time.perf_counter() - t
                row = {"pass": name, "round": r + 1, "seconds": s, "tiles_per_s": n_tiles / s, "gb_per_s": raw_gb / s}
                rows.append({**row, "peak_rss_mb": rss_mb("VmHWM")})
        read = statistics.median(x["tiles_per_s"] for x in rows if x["pass"] == "read")
        score = statistics.median(x["tiles_per_s"] for x in rows if x["pass"] == "score")
        per_round = [
            rows[2 * i + 1]["tiles_per_s"] / rows[2 * i]["tiles_per_s"] for i in range(args.rounds)
        ]  # score / read of the same round
        cores = core_seconds(results, ids, emb, args.chunk_rows)
        read_s = cores["read_core_s_per_slide"]
        bound = read_s / (read_s + cores["score_core_s_per_slide"] + cores["write_core_s_per_slide"])
        print(
            f"{args.slides} slides x {args.tiles} tiles x {args.dim} fp16 ({raw_gb:.2f} GB raw, {disk / 1e9:.2f} GB "
            f"on disk, written in {write_s:.0f} s), {args.concepts} concepts, chunk_rows {args.chunk_rows}, "
            f"{usable_cpus()} threads, page cache {'kept' if args.warm else 'evicted before each pass'}"
        )
        print_table(rows, ["pass", "round", "seconds", "tiles_per_s", "gb_per_s", "peak_rss_mb"])
        print(
            f"score / read (medians): {score / read:.3f}; per round: {', '.join(f'{x:.3f}' for x in per_round)}; "
            f"goal >= 0.8"
        )
        arith, write = cores["score_core_s_per_slide"] * 1e3, cores["write_core_s_per_slide"] * 1e3
        print(
            f"CPU per slide, one thing at a time: read {read_s * 1e3:.1f} ms, scoring arithmetic {arith:.1f} ms, "
            f"writing the scores {write:.1f} ms: when the read is CPU-bound too, score/read cannot exceed "
            f"read/(read+arithmetic+write) = {bound:.3f}"
        )
        load = {"before": load_before, "after": os.getloadavg()}
        print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']} on {usable_cpus()} CPUs")
        peak = max(x["peak_rss_mb"] for x in rows)
        print(
            f"RSS before the passes {base_rss:.0f} MB, peak during them {peak:.0f} MB "
            f"(one slide's features: {args.tiles * args.dim * 2 / 1e6:.0f} MB; all of them: {raw_gb * 1e3:.0f} MB)"
        )
        out = write_results(
            args.name,
            {
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "disk_bytes": disk,
                "rows": rows,
                "read_tiles_per_s": read,
                "score_tiles_per_s": score,
                "ratio": score / read,
                "ratio_per_round": per_round,
                **cores,
                "cpu_bound_ceiling": bound,
                "load_average": load,
                "rss_before_mb": base_rss,
                "peak_rss_mb": peak,
                "goal": "score rate >= 0.8 x plain read rate of the same feature stores",
            },
        )
        print(f"wrote {out}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
