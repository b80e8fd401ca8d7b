"""Classic MIL benchmarks (Musk1, Musk2, Elephant) with the protocol of Ilse et al. 2018.

10-fold CV repeated 5 times, bag accuracy, mean +- SE; everything fitted inside each training fold (an averaged
ensemble by default, or inner-CV selection with `--readout select`; see wsi_pipeline/mil/bench.py). Writes
benchmarks/results/mil_<dataset>.json (with the machine) and prints a table next to the gated-attention figures of
the paper.

    .venv/bin/python benchmarks/bench_mil.py [--data ../shared/data/mil] [--datasets musk1 musk2 elephant]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from wsi_pipeline.mil.bench import bench_mil

PAPER = {"musk1": 0.900, "musk2": 0.863, "elephant": 0.857}  # Ilse et al. 2018, Table 1, gated attention
ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parents[1] / "shared" / "data" / "mil")
    ap.add_argument("--datasets", nargs="+", default=["musk2", "musk1", "elephant"])  # longest first
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="abmil-gated")
    ap.add_argument("--readout", default="average", choices=["average", "select"])
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--jobs", type=int, default=2, help="datasets run in parallel, one torch thread each")
    args = ap.parse_args()
    jobs = [(args.data / f"{name}.csv", args.out / f"mil_{name}.json") for name in args.datasets]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                bench_mil,
                csv,
                folds=args.folds,
                repeats=args.repeats,
                model=args.model,
                readout=args.readout,
                out_json=out,
                threads=1,
            )
            for csv, out in jobs
        ]
        results = [f.result() for f in futures]
    rows = [
        (name, r["accuracy_mean"], r["accuracy_se"], PAPER.get(name), r["seconds"])
        for name, r in zip(args.datasets, results, strict=True)
    ]
    print(f"\n{'dataset':<10}{'accuracy':>10}{'SE':>8}{'paper':>8}{'seconds':>9}")
    for name, acc, se, paper, secs in rows:
        print(f"{name:<10}{acc:>10.3f}{se:>8.3f}{paper or float('nan'):>8.3f}{secs:>9.0f}")
    print(json.dumps({n: {"accuracy_mean": a, "accuracy_se": s} for n, a, s, _, _ in rows}))


if __name__ == "__main__":
    main()
