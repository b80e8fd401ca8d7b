"""Encoder-only throughput (tiles/s) on synthetic uint8 tiles already on the device.

Measures `encoder.encode_uint8` (device preprocessing + model) for a batch-size sweep; no data loading or
storage. Prints a table and writes benchmarks/results/encoder_<hostname>.json with the machine's details.

    python benchmarks/bench_encoder.py --quick                  # CPU-friendly: small batches, one timed pass
    python benchmarks/bench_encoder.py --device cuda --batch-sizes 64,128,256,512 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import torch

from wsi_pipeline.encoders import EncoderConfig, build_encoder
from wsi_pipeline.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(encoder, batch_size: int, tile_size: int, iters: int, warmup: int) -> dict:
    device = encoder.device
    gen = torch.Generator(device="cpu").manual_seed(batch_size)
    tiles = torch.randint(0, 256, (batch_size, tile_size, tile_size, 3), dtype=torch.uint8, generator=gen)
    tiles = tiles.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        encoder.encode_uint8(tiles)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = encoder.encode_uint8(tiles)
    _sync(device)
    elapsed = time.perf_counter() - t0
    row = {
        "batch_size": batch_size,
        "tile_size": tile_size,
        "iters": iters,
        "seconds": round(elapsed, 4),
        "tiles_per_s": round(batch_size * iters / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / iters, 2),
        "embed_dim": int(out.shape[1]),
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="conceptclip-arch-random,stain-texture")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default=None, help="comma-separated; default depends on device and --quick")
    p.add_argument("--tile-size", type=int, default=224, help="input tile edge in px (resized on the device)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small batches and one timed pass (CPU-friendly)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick or device.type == "cpu" and args.batch_sizes is None
    iters = args.iters or (1 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    results = []
    for name in [n.strip() for n in args.encoders.split(",") if n.strip()]:
        t0 = time.perf_counter()
        enc = build_encoder(EncoderConfig(name=name, precision=args.precision, compile=args.compile), device)
        build_s = time.perf_counter() - t0
        if args.batch_sizes:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
        elif name == "stain-texture":
            sizes = [32, 64] if quick else [64, 128, 256]
        else:
            sizes = [1, 2] if quick else [32, 64, 128, 256, 512]
        for bs in sizes:
            row = bench_one(enc, bs, args.tile_size, iters, warmup)
            row.update(
                encoder=name,
                build_s=round(build_s, 2),
                precision=args.precision if device.type == "cuda" and name != "stain-texture" else "fp32",
                compiled=bool(args.compile and name != "stain-texture"),
            )
            results.append(row)
            print(
                f"{name:>24} bs={bs:<4} {row['tiles_per_s']:>10.2f} tiles/s  {row['ms_per_batch']:>10.1f} ms/batch"
                f"  {row.get('peak_mem_gib', '-')} GiB",
                flush=True,
            )
        del enc
    report = {
        "benchmark": "encoder_throughput",
        "machine": machine_info(str(device)),
        "quick": quick,
        "results": results,
    }
    print()
    print(f"{'encoder':>24} {'batch':>6} {'tiles/s':>10} {'ms/batch':>10} {'precision':>9}")
    for r in results:
        print(
            f"{r['encoder']:>24} {r['batch_size']:>6} {r['tiles_per_s']:>10.2f} {r['ms_per_batch']:>10.1f}"
            f" {r['precision']:>9}"
        )
    out = args.out or RESULTS / f"encoder_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}  ({report['machine']['device_name']}, torch {torch.__version__})")
    return report


if __name__ == "__main__":
    main()
