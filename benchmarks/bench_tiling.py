"""Stage-1 benchmark: tiling time per slide, and tile read+decode+resize rate per core against bare OpenSlide.

    .venv/bin/python benchmarks/bench_tiling.py [--tiles 1500] [--skip-large]

The large slide is a ~100,000 x 80,000 px 40x synthetic SVS (generated once, cached in benchmarks/.cache).
The read comparison runs on one core over the same tiles: ours (`wsi_pipeline.tiling.read_tile`: our reader,
RGB conversion, one resize) against a bare loop (`openslide.OpenSlide.read_region`, drop alpha, one cv2.resize),
interleaved in rounds so machine noise hits both alike. Ratio = our rate / bare rate (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import openslide

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from wsi_pipeline.slide.reader import open_slide  # noqa: E402
from wsi_pipeline.tiling.config import TilingParams  # noqa: E402
from wsi_pipeline.tiling.geometry import plan_geometry, read_tile  # noqa: E402
from wsi_pipeline.tiling.stage import tile_slide  # noqa: E402
from wsi_pipeline.tiling.table import read_tile_table  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"


def bare_read(osr: openslide.OpenSlide, xy, level: int, size: int, tile_px: int) -> np.ndarray:
    rgb = np.asarray(osr.read_region((int(xy[0]), int(xy[1])), level, (size, size)))[..., :3]
    return cv2.resize(rgb, (tile_px, tile_px), interpolation=cv2.INTER_AREA) if size != tile_px else rgb


def compare_reads(path: Path, coords: np.ndarray, mpp: float | None, rounds: int = 3) -> dict:
    """Tiles/s of ours vs bare OpenSlide on the same coordinates, single process, interleaved rounds."""
    cv2.setNumThreads(1)  # per core
    with open_slide(path, mpp=mpp) as slide:
        geometry = plan_geometry(slide, TilingParams())
        osr = openslide.OpenSlide(str(path))
        ours_t, bare_t = 0.0, 0.0
        for _ in range(rounds):
            t = time.perf_counter()
            for xy in coords:
                bare_read(osr, xy, geometry.read_level, geometry.read_size, geometry.tile_px)
            bare_t += time.perf_counter() - t
            t = time.perf_counter()
            for xy in coords:
                read_tile(slide, xy, geometry)
            ours_t += time.perf_counter() - t
        osr.close()
    n = len(coords) * rounds
    return {
        "tiles": n,
        "ours_tiles_per_s": n / ours_t,
        "bare_tiles_per_s": n / bare_t,
        "ratio": bare_t / ours_t,
        "read_level": geometry.read_level,
        "read_size": geometry.read_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=1500, help="tiles per read comparison")
    ap.add_argument("--skip-large", action="store_true", help="only the real slides")
    args = ap.parse_args()

    slides: list[tuple[str, Path, float | None]] = [
        ("cmu-1-small-region (real, 20x)", SHARED / "cmu-1-small-region.svs", None),
        ("tcga jp2k (real, mpp override 0.25)", SHARED / "tcga-cr-7395-01a-01-ts1.svs", 0.25),
    ]
    if not args.skip_large:
        from make_large_slide import ensure_large_slide

        t = time.perf_counter()
        large = ensure_large_slide()
        print(f"large slide ready in {time.perf_counter() - t:.1f} s: {large}")
        slides.append(("synthetic 100k x 80k (40x)", large, None))

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    try:
        rng = np.random.default_rng(0)
        for name, path, mpp in slides:
            t = time.perf_counter()
            side = tile_slide(path, tmp, mpp=mpp)
            seconds = time.perf_counter() - t
            table = read_tile_table(tmp / "tiles" / f"{side['slide_id']}.zarr")
            pick = table.coords[rng.choice(len(table), size=min(args.tiles, len(table)), replace=False)]
            reads = compare_reads(path, pick, mpp, rounds=3 if len(pick) < 200 else 1)
            w, h = side["slide"]["dimensions"]
            rows.append(
                {
                    "slide": name,
                    "size": f"{w}x{h}",
                    "n_tiles": side["n_tiles"],
                    "tiling_s": seconds,
                    "tiles_per_s_tiling": side["n_tiles"] / seconds,
                    **reads,
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, ["slide", "size", "n_tiles", "tiling_s", "ours_tiles_per_s", "bare_tiles_per_s", "ratio"])
    out = write_results("tiling", {"rows": rows, "goal": "ratio >= 0.9 (ours / bare openslide, one core)"})
    print(f"results: {out}")


if __name__ == "__main__":
    main()
