"""Classic MIL benchmarks (Musk1, Musk2, Elephant) with the protocol of Ilse et al. 2018.

10-fold CV repeated 5 times, bag accuracy, mean +- SE; hyper-parameters chosen inside each training fold
(see wsi_pipeline/mil/bench.py). Writes benchmarks/results/mil_<dataset>.json (with the machine) and prints a table
next to the gated-attention figures of the paper.

    .venv/bin/python benchmarks/bench_mil.py [--data ../shared/data/mil] [--datasets musk1 musk2 elephant]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_pipeline.mil.bench import bench_mil

PAPER = {"musk1": 0.900, "musk2": 0.863, "elephant": 0.857}  # Ilse et al. 2018, Table 1, gated attention
ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parents[1] / "shared" / "data" / "mil")
    ap.add_argument("--datasets", nargs="+", default=list(PAPER))
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="abmil-gated")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    rows = []
    for name in args.datasets:
        res = bench_mil(args.data / f"{name}.csv", folds=args.folds, repeats=args.repeats, model=args.model,
                        out_json=args.out / f"mil_{name}.json")
        rows.append((name, res["accuracy_mean"], res["accuracy_se"], PAPER.get(name), res["seconds"]))
    print(f"\n{'dataset':<10}{'accuracy':>10}{'SE':>8}{'paper':>8}{'seconds':>9}")
    for name, acc, se, paper, secs in rows:
        print(f"{name:<10}{acc:>10.3f}{se:>8.3f}{paper or float('nan'):>8.3f}{secs:>9.0f}")
    print(json.dumps({n: {"accuracy_mean": a, "accuracy_se": s} for n, a, s, _, _ in rows}))


if __name__ == "__main__":
    main()
