"""Write (once) the ~100,000 x 80,000 px 40x synthetic Aperio SVS that the tiling benchmark reads.

Cached at ``benchmarks/.cache/large_40x.svs``; a JSON sidecar records the generator parameters, the time the
write took and the machine, so a changed parameter set regenerates the slide. Run directly to (re)build:

    python benchmarks/make_large_slide.py [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from wsi_pipeline.synthetic import write_synthetic_slide  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
LARGE = CACHE / "large_40x.svs"
PARAMS = {
    "width": 100_000,
    "height": 80_000,
    "mpp": 0.25,
    "fmt": "svs",
    "seed": 0,
    "tile_size": 256,
    "jpeg_quality": 80,
}


def ensure_large_slide(path: Path = LARGE, *, params: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Return the cached slide at `path` written with `params` (default PARAMS), writing it first if missing or
    written with other parameters. Other benchmarks cache their own slides through here."""
    params = params or PARAMS
    meta = path.with_suffix(".json")
    if not force and path.exists() and meta.exists():
        if json.loads(meta.read_text()).get("params") == params:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.svs")  # never leave a half-written slide under the real name
    t0 = time.perf_counter()
    spec = write_synthetic_slide(partial, **params)
    seconds = time.perf_counter() - t0
    partial.replace(path)
    n_tiles = sum(len(p.dataoffsets) for p in tifffile.TiffFile(path).pages if p.is_tiled)
    result = {
        "params": params,
        "seconds": round(seconds, 2),
        "bytes": path.stat().st_size,
        "tiles_written": n_tiles,
        "level_dimensions": spec.level_dimensions,
        "tissue_fraction": round(float(spec.truth_mask(64.0).mean()), 4),
        "tifffile": tifffile.__version__,
        "machine": machine_info(),
    }
    meta.write_text(json.dumps(result, indent=2))
    print(f"{'slide':<28}{'size (px)':>18}{'levels':>8}{'tiles':>10}{'GiB':>8}{'seconds':>10}")
    print(
        f"{path.name:<28}{params['width']:>9,} x {params['height']:<7,}{len(spec.level_downsamples):>8}"
        f"{n_tiles:>10,}{result['bytes'] / 2**30:>8.2f}{seconds:>10.1f}"
    )
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rewrite even if a cached slide exists")
    print(ensure_large_slide(force=parser.parse_args().force))
