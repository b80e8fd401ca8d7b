"""Epoch time of ABMIL on bags read from per-slide Zarr stores vs the same bags held in memory.

Default (CPU-sized): 100 bags x 2,000 tiles x 1152 fp16 features; `--bags 1000 --tiles 10000` is the full size.
Prints a table and the Zarr/in-memory ratio; writes benchmarks/results/mil_io.json with the machine.

    .venv/bin/python benchmarks/bench_mil_io.py [--bags 100] [--tiles 2000] [--dim 1152] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wsi_pipeline.machine import machine_info
from wsi_pipeline.mil.bags import ArrayStore, Bag, ZarrStore
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.engine import Problem, fit, model_spec


def write_stores(root: Path, n_bags: int, tiles: int, dim: int, seed: int = 0) -> tuple[list[Bag], dict]:
    rng = np.random.default_rng(seed)
    bags, arrays = [], {}
    for i in range(n_bags):
        sid = f"slide{i:04d}"
        feats = rng.standard_normal((tiles, dim), dtype=np.float32).astype(np.float16)
        group = zarr.open_group(str(root / f"{sid}.zarr"), mode="w")
        group.create_array("features", data=feats, chunks=(1024, dim))  # stage 2's layout: row chunks
        group.create_array("coords", data=np.zeros((tiles, 2), np.int64))
        group.attrs.update({"encoder": "synthetic", "embed_dim": dim})
        arrays[sid] = feats
        bags.append(Bag(sid, [sid], label=i % 2))
    return bags, arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mil_io.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mil_io_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        bags, arrays = write_stores(root, args.bags, args.tiles, args.dim)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        problem = Problem("classification", "ce", 2, ["a", "b"])
        cfg = TrainConfig(epochs=args.epochs, batch_size=1, max_instances=None, quiet=True, device=args.device,
                          hidden_dim=128, attn_dim=128, class_weights=False, num_threads=args.threads)
        spec = model_spec(cfg, args.dim, problem)
        rows = []
        for name, store in (("in memory (fp16 arrays)", ArrayStore({k: v for k, v in arrays.items()})),
                            ("zarr, no cache", ZarrStore(root, cache_bytes=0))):
            if isinstance(store, ZarrStore):
                store.check(bags)
            else:  # same dtype conversion per step as the Zarr path: only the reading differs
                store.load = lambda bag, s=store: s.arrays[bag.bag_id].astype(np.float32)  # type: ignore[method-assign]
            start = time.perf_counter()
            _, info = fit(spec, store, bags, [], problem, cfg)
            epoch_s = (time.perf_counter() - start) / args.epochs
            rows.append({"source": name, "epoch_s": epoch_s, "bags_per_s": args.bags / epoch_s})
        ratio = rows[1]["epoch_s"] / rows[0]["epoch_s"]
        print(f"ABMIL epoch, {args.bags} bags x {args.tiles} tiles x {args.dim} fp16 ({disk / 1e9:.2f} GB on disk), "
              f"device {info['device']}")
        print(f"{'source':<26}{'epoch [s]':>12}{'bags/s':>10}")
        for r in rows:
            print(f"{r['source']:<26}{r['epoch_s']:>12.2f}{r['bags_per_s']:>10.1f}")
        print(f"zarr / in-memory epoch time: {ratio:.2f}x")
        result = {"bags": args.bags, "tiles": args.tiles, "dim": args.dim, "epochs": args.epochs,
                  "disk_bytes": disk, "write_s": write_s, "rows": rows, "ratio_zarr_over_memory": ratio,
                  "machine": machine_info(str(info["device"])) | {"torch_threads": args.threads}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
