"""Epoch time of ABMIL on bags read from per-slide Zarr stores vs the same bags held in memory.

Full size (the issue's): `--bags 1000 --tiles 10000` x 1152 fp16 = 23 GB on disk, more than this VM's RAM, so the
in-memory side runs on the first `--memory-bags` bags and the comparison is per bag (compute per bag is the same:
every bag has `--tiles` tiles). The Zarr side reads all bags, first in line (loader_threads=0), then with the
trainer's read-ahead threads; `--drop-caches` (root only) empties the page cache before each Zarr epoch so the
reads come from the disk. Prints a table and writes benchmarks/results/mil_io.json with the machine.

    .venv/bin/python benchmarks/bench_mil_io.py                                  # CPU-sized: 100 x 2,000
    .venv/bin/python benchmarks/bench_mil_io.py --bags 1000 --tiles 10000 --memory-bags 200 --drop-caches
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from wsi_pipeline.devices import resolve_device
from wsi_pipeline.machine import machine_info
from wsi_pipeline.mil.bags import ArrayStore, Bag, ZarrStore
from wsi_pipeline.mil.config import TrainConfig
from wsi_pipeline.mil.engine import Problem, fit, model_spec


def write_stores(root: Path, n_bags: int, tiles: int, dim: int, seed: int = 0) -> list[Bag]:
    """One store per bag, written one at a time (the full size does not fit in memory)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        sid = f"slide{i:04d}"
        feats = rng.standard_normal((tiles, dim), dtype=np.float32).astype(np.float16)
        group = zarr.open_group(str(root / f"{sid}.zarr"), mode="w")
        group.create_array("features", data=feats, chunks=(1024, dim))  # stage 2's layout: row chunks
        group.create_array("coords", data=np.zeros((tiles, 2), np.int64))
        group.attrs.update({"encoder": "synthetic", "embed_dim": dim})
        bags.append(Bag(sid, [sid], label=i % 2))
    return bags


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--memory-bags", type=int, default=None, help="bags held in memory (default: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--loader-threads", type=int, default=2, help="read-ahead threads of the trainer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each Zarr epoch")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mil_io.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mil_io_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        bags = write_stores(root, args.bags, args.tiles, args.dim)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        problem = Problem("classification", "ce", 2, ["a", "b"])
        base = TrainConfig(
            epochs=args.epochs,
            batch_size=1,
            max_instances=None,
            quiet=True,
            device=args.device,
            hidden_dim=128,
            attn_dim=128,
            class_weights=False,
            num_threads=args.threads,
            cache_bytes=0,
        )
        spec = model_spec(base, args.dim, problem)
        zarr_store = ZarrStore(root, cache_bytes=0)
        zarr_store.check(bags)
        in_memory = bags[: args.memory_bags or len(bags)]
        held = {b.bag_id: np.asarray(zarr_store.open(b.bag_id)["features"][...]) for b in in_memory}
        memory = ArrayStore(held)
        memory.load = lambda bag: held[bag.bag_id].astype(np.float32)  # type: ignore[method-assign] # same cast
        runs = [
            ("in memory (fp16 arrays)", memory, in_memory, 0),
            ("zarr, read in line", zarr_store, bags, 0),
            (f"zarr, {args.loader_threads} read-ahead threads", zarr_store, bags, args.loader_threads),
        ]
        fit(spec, memory, in_memory[:2], [], problem, base.model_copy(update={"epochs": 1}))  # warm-up, untimed
        rows, cold = [], None
        for name, store, subset, loader_threads in runs:
            if store is zarr_store and args.drop_caches:
                cold = drop_page_cache()
            cfg = base.model_copy(update={"loader_threads": loader_threads})
            start = time.perf_counter()
            fit(spec, store, subset, [], problem, cfg)
            epoch_s = (time.perf_counter() - start) / args.epochs
            rows.append(
                {"source": name, "bags": len(subset), "epoch_s": epoch_s, "ms_per_bag": 1000 * epoch_s / len(subset)}
            )
            if store is memory:
                del held  # free the RAM before the Zarr epochs, so the page cache is not squeezed by it
                memory.arrays = {}
        device = str(resolve_device(args.device))
        print(
            f"ABMIL epoch, {args.bags} bags x {args.tiles} tiles x {args.dim} fp16 ({disk / 1e9:.2f} GB on disk), "
            f"device {device}, torch threads {args.threads}, page cache dropped: {cold}"
        )
        print(f"{'source':<30}{'bags':>6}{'epoch [s]':>12}{'ms/bag':>10}{'vs memory':>11}")
        for r in rows:
            r["ratio_vs_memory"] = r["ms_per_bag"] / rows[0]["ms_per_bag"]
            print(
                f"{r['source']:<30}{r['bags']:>6}{r['epoch_s']:>12.2f}{r['ms_per_bag']:>10.1f}"
                f"{r['ratio_vs_memory']:>11.2f}"
            )
        result = {
            "bags": args.bags,
            "tiles": args.tiles,
            "dim": args.dim,
            "epochs": args.epochs,
            "memory_bags": len(in_memory),
            "disk_bytes": disk,
            "write_s": write_s,
            "page_cache_dropped": cold,
            "rows": rows,
            "ratio_zarr_over_memory": rows[-1]["ratio_vs_memory"],
            "ratio_zarr_in_line_over_memory": rows[1]["ratio_vs_memory"],
            "machine": machine_info(device) | {"torch_threads": args.threads},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
