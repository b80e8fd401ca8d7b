"""Stage-2 benchmark: encoder-only throughput, end-to-end engine throughput, a naive CLAM-style baseline, host RSS.

    .venv/bin/python benchmarks/bench_encode.py [--encoder conceptclip-arch-random] [--quick]

(a) encoder only: synthetic uint8 tiles already on the device, batch-size sweep (tiles/s).
(b) engine: `encode_slide` on real slides (the CMU slide, stage-1 tiled) and synthetic SVS slides; on a GPU a
    synthetic cohort sized to run about a minute. Tiles/s from the sidecars (model loading excluded).
(c) naive baseline in the style of CLAM's extractor: per-tile `openslide.read_region` -> PIL -> torchvision
    Resize/ToTensor/Normalize, default DataLoader (no pinned memory), fp32 model, features kept in a list.
Ratios: (b)/(a) = how close the engine gets to the encoder's own speed; (b)/(c) = speed-up over the baseline.
Host peak RSS per phase from /proc/self/status VmHWM (reset between phases via /proc/self/clear_refs).

--quick (for a small CPU machine): ConceptCLIP's tower type (timm ViT with attention pooling, random weights) at
ViT-Tiny size: `conceptclip-arch-random` with model_id vit_tiny_patch16_224 at 224 px, a few hundred tiles.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from wsi_pipeline.encode.engine import encode_slide  # noqa: E402
from wsi_pipeline.encoders import EncoderConfig, TorchTileEncoder, build_encoder  # noqa: E402
from wsi_pipeline.layout import ResultsLayout  # noqa: E402
from wsi_pipeline.synthetic import write_synthetic_slide  # noqa: E402
from wsi_pipeline.tiling.stage import tile_slide  # noqa: E402
from wsi_pipeline.tiling.table import read_tile_table  # noqa: E402

SHARED = Path(os.environ.get("WSI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "slides"


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (Linux)


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_only(enc, batch: int, tile_px: int, seconds: float) -> dict:
    """(a) tiles/s on uint8 batches already on the device; None if the batch does not fit."""
    tiles = torch.randint(0, 256, (batch, tile_px, tile_px, 3), dtype=torch.uint8, device=enc.device)
    try:
        enc.encode_uint8(tiles)  # warm-up (and compilation, if any)
        sync(enc.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2 * batch:
            enc.encode_uint8(tiles)
            n += batch
        sync(enc.device)
    except torch.OutOfMemoryError:
        return {"batch": batch, "tiles_per_s": None, "note": "out of memory"}
    return {"batch": batch, "tiles_per_s": n / (time.perf_counter() - t0)}


def make_slides(
    root: Path, results: Path, n: int, width: int, height: int, include_cmu: bool, prefix: str = "synth", first: int = 0
) -> list[str]:
    ids = []
    if include_cmu and (SHARED / "cmu-1-small-region.svs").is_file():
        tile_slide(SHARED / "cmu-1-small-region.svs", results)
        ids.append("cmu-1-small-region")
    for i in range(first, first + n):
        spec = write_synthetic_slide(
            root / f"{prefix}_{i:03d}.svs", width=width, height=height, mpp=0.5, seed=i, jpeg_quality=80
        )
        side = tile_slide(spec.path, results)
        if side["n_tiles"]:
            ids.append(f"{prefix}_{i:03d}")
    return ids


def engine(enc, cfg: EncoderConfig, results: Path, ids: list[str], batch: int, workers: int) -> dict:
    """(b) end-to-end through `encode_slide` with one prebuilt model; tiles/s over the whole cohort."""
    reset_peak_rss()
    tiles, secs, per_slide = 0, 0.0, []
    for sid in ids:
        side = encode_slide(results, sid, cfg, batch_size=batch, num_workers=workers, encoder=enc, force=True)
        assert side["status"] == "ok", side
        tiles += side["n_tiles"]
        secs += side["seconds"]
        per_slide.append({"slide": sid, "tiles": side["n_tiles"], "tiles_per_s": side["tiles_per_s"]})
    return {
        "tiles": tiles,
        "seconds": secs,
        "tiles_per_s": tiles / secs,
        "peak_rss_mb": peak_rss_mb(),
        "per_slide": per_slide,
    }


class NaiveTiles(torch.utils.data.Dataset):
    """CLAM-style: one OpenSlide handle opened up front, PIL tiles, torchvision transforms per tile."""

    def __init__(self, table, transform) -> None:
        import openslide

        a = table.attrs
        self.wsi = openslide.OpenSlide(a["slide_path"])
        self.coords, self.level, self.size, self.transform = table.coords, a["read_level"], a["read_size"], transform

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int):
        x, y = self.coords[i]
        img = self.wsi.read_region((int(x), int(y)), self.level, (self.size, self.size)).convert("RGB")
        return self.transform(img), self.coords[i]


def naive(enc: TorchTileEncoder, results: Path, ids: list[str], batch: int, workers: int) -> dict:
    """(c) the baseline: fp32, no pinned memory, features accumulated in host memory."""
    from torchvision import transforms

    prep = enc.preprocessing
    tf = transforms.Compose(
        [
            transforms.Resize((prep.size, prep.size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    reset_peak_rss()
    tiles, t0, feats = 0, time.perf_counter(), {}
    for sid in ids:
        table = read_tile_table(results / "tiles" / f"{sid}.zarr")
        loader = torch.utils.data.DataLoader(NaiveTiles(table, tf), batch_size=batch, num_workers=workers)
        out = []
        with torch.inference_mode():
            for x, _ in loader:
                out.append(enc.module(x.to(enc.device)).float().cpu().numpy())
        feats[sid] = np.concatenate(out)
        tiles += len(table)
    secs = time.perf_counter() - t0
    return {
        "tiles": tiles,
        "seconds": secs,
        "tiles_per_s": tiles / secs,
        "peak_rss_mb": peak_rss_mb(),
        "features": feats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="conceptclip-arch-random")
    ap.add_argument("--model-id", default=None, help="encoder.model_id (quick: vit_tiny_patch16_224)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a small CPU machine")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="batch size for (b) and (c)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 avoids OpenMP stalls on a CPU shared with other jobs)",
    )
    ap.add_argument("--cohort-seconds", type=float, default=60.0, help="GPU: size the cohort to run about this long")
    args = ap.parse_args()

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    quick = args.quick or device.type == "cpu"
    model_id = args.model_id or (
        "vit_tiny_patch16_224" if quick and args.encoder == "conceptclip-arch-random" else None
    )
    image_size = args.image_size or (224 if model_id == "vit_tiny_patch16_224" else None)
    cfg = EncoderConfig(name=args.encoder, model_id=model_id, image_size=image_size)
    workers = args.workers if args.workers is not None else (2 if quick else min(8, os.cpu_count() or 1))
    sweep = [4, 8, 16, 32] if quick else [32, 64, 128, 256, 512]
    tile_px = 256
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    t = time.perf_counter()
    enc = build_encoder(cfg, device)
    load_s = time.perf_counter() - t
    rows_a = [encoder_only(enc, b, tile_px, 3.0 if quick else 10.0) for b in sweep]
    fitting = [r for r in rows_a if r["tiles_per_s"]]
    best_a = max(fitting, key=lambda r: r["tiles_per_s"])
    batch = args.batch or best_a["batch"]
    rate_a = next((r["tiles_per_s"] for r in rows_a if r["batch"] == batch), best_a["tiles_per_s"])

    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        results = tmp / "results"
        if quick:
            ids = make_slides(tmp, results, 2, 4096, 3072, include_cmu=True)
        else:  # about `cohort_seconds` of work at the encoder's own speed; 20k x 16k slides, ~2-3k tiles each
            ids = make_slides(tmp, results, 0, 0, 0, include_cmu=True)
            target = rate_a * args.cohort_seconds
            i = 0
            while sum(len(read_tile_table(results / "tiles" / f"{s}.zarr")) for s in ids) < target:
                ids += make_slides(tmp, results, 1, 20480, 16384, include_cmu=False, prefix="cohort", first=i)
                i += 1
        b = engine(enc, cfg, results, ids, batch, workers)
        c = naive(enc, results, ids, batch, workers) if isinstance(enc, TorchTileEncoder) else None
        fidelity = None
        if c is not None:
            cos = []
            for sid in ids:
                import zarr

                eng = np.asarray(
                    zarr.open_array(str(ResultsLayout(results).feature_store(cfg.name, sid) / "features"))[...],
                    dtype=np.float32,
                )
                ref = c["features"][sid]
                cos.append((eng * ref).sum(1) / np.linalg.norm(eng, axis=1) / np.linalg.norm(ref, axis=1))
            fidelity = float(np.concatenate(cos).min())
            c.pop("features")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nencoder {cfg.name} ({model_id or 'default arch'}) on {device}; model load {load_s:.1f} s\n")
    print("(a) encoder only, uint8 tiles on the device")
    print_table(rows_a, ["batch", "tiles_per_s", "note"])
    summary = [
        {"path": "(a) encoder only", "tiles": None, "tiles_per_s": rate_a, "peak_rss_mb": None},
        {"path": "(b) engine", "tiles": b["tiles"], "tiles_per_s": b["tiles_per_s"], "peak_rss_mb": b["peak_rss_mb"]},
    ]
    if c:
        summary.append(
            {
                "path": "(c) naive CLAM-style",
                "tiles": c["tiles"],
                "tiles_per_s": c["tiles_per_s"],
                "peak_rss_mb": c["peak_rss_mb"],
            }
        )
    print(
        f"\nbatch {batch}, {workers} reader workers, {torch.get_num_threads()} torch threads, {len(ids)} slides, "
        f"load average before {load_before[0]:.2f}"
    )
    print_table(summary, ["path", "tiles", "tiles_per_s", "peak_rss_mb"])
    ratios = {
        "b_over_a": b["tiles_per_s"] / rate_a,
        "b_over_c": b["tiles_per_s"] / c["tiles_per_s"] if c else None,
        "min_cosine_engine_vs_naive": fidelity,
    }
    print("\n" + "  ".join(f"{k} = {v:.3f}" for k, v in ratios.items() if v is not None))
    out = write_results(
        "encode",
        {
            "encoder": cfg.model_dump(),
            "device": str(device),
            "quick": quick,
            "model_load_seconds": load_s,
            "batch": batch,
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "slides": ids,
            "encoder_only": rows_a,
            "engine": b,
            "naive": c,
            "ratios": ratios,
            "notes": "quick: conceptclip-arch-random with model_id vit_tiny_patch16_224 (random weights) at 224 px"
            if quick
            else "GPU run",
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
