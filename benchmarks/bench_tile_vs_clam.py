"""Stage 1 side by side: `wsi-pipeline tile` against CLAM's `create_patches_fp.py` on one large synthetic slide.

    .venv/bin/python benchmarks/bench_tile_vs_clam.py --clam /path/to/CLAM [--clam-commit SHA] [--repeats 3]

Goal (project issue): on a 60,000 x 45,000 px synthetic 40x SVS, our wall time <= 0.5x CLAM's and our peak
memory <= 1.2x CLAM's, in one side-by-side run.

- The slide comes from the project's generator (`write_synthetic_slide`, as in make_large_slide.py), written once
  to benchmarks/.cache/clam_bench_60k_40x.svs with a JSON sidecar of its parameters.
- CLAM is an unmodified checkout outside this repository (mahmoodlab/CLAM; never copy it in), run from its folder
  with the .venv's python and its README's "basic, fully automated run", i.e. the default parameters hard-coded
  in create_patches_fp.py (no --preset): `create_patches_fp.py --source DIR --save_dir OUT --patch_size 256 --seg
  --patch --stitch`. It needs cv2, openslide, h5py, pandas, matplotlib, PIL, tqdm: all in the .venv already.
- Ours: the `wsi-pipeline` console script beside sys.executable, default settings (`tile SLIDE --out OUT`).
  Defaults differ in what they tile: CLAM patches 256 px at level 0 (0.25 um/px here), ours 256 px at 0.5 um/px
  (512 px of level 0), so CLAM's patch count is ~4x ours for the same tissue. Both write coordinates, not pixels.
- Each run gets a fresh output folder. One untimed warm-up of each tool (page cache warm), then --repeats rounds,
  the order of the two tools alternating per round. Wall: time.perf_counter around the subprocess.
- Peak memory: ru_maxrss from os.wait4 on the child's pid. On Linux that is the largest *single* process of the
  tree (the child or any descendant it waited for), not their sum. CLAM's patching uses a multiprocessing.Pool of
  min(4, cpu_count) forked workers, so the table also shows a sampled (every 50 ms, psutil) sum of RSS over the
  process tree; it over-counts pages shared between forked workers and can miss short spikes.
- Also recorded: the time to `import wsi_pipeline.cli` in a fresh interpreter and which heavy modules it loads,
  and which wsi_pipeline was run. To time a committed version while the work tree is mid-edit, put an exported
  tree first on the path: `git archive HEAD wsi_pipeline | tar -x -C /tmp/snap; PYTHONPATH=/tmp/snap python ...`
  (children inherit it; the editable install's finder comes after PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402
from make_large_slide import ensure_large_slide  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
SLIDE = CACHE / "clam_bench_60k_40x.svs"
PARAMS = {"width": 60_000, "height": 45_000, "mpp": 0.25, "fmt": "svs", "seed": 0, "tile_size": 256, "jpeg_quality": 80}
GOALS = {"wall_ratio_max": 0.5, "peak_rss_ratio_max": 1.2}
HEAVY = ("torch", "transformers", "sklearn", "timm", "open_clip")
IMPORT_PROBE = (
    "import json, sys, time; t = time.perf_counter(); import wsi_pipeline.cli; "
    f"print(json.dumps([time.perf_counter() - t, [m for m in {HEAVY!r} if m in sys.modules], "
    "sys.modules['wsi_pipeline'].__file__]))"
)


def _tree_rss_sampler(pid: int, peak: list[int], stop: threading.Event) -> None:
    """Keep peak[0] = the largest sum of RSS (bytes) seen over `pid` and its descendants."""
    try:
        import psutil
    except ImportError:
        return
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        peak[0] = max(peak[0], total)
        stop.wait(0.05)


def measure(cmd: list[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run `cmd`; wall seconds, peak RSS of the largest process in its tree (wait4) and sampled tree RSS."""
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        peak, stop = [0], threading.Event()
        sampler = threading.Thread(target=_tree_rss_sampler, args=(proc.pid, peak, stop), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen from waiting again
    if proc.returncode != 0:
        sys.exit(f"{cmd[:2]} exited {proc.returncode}; log {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "tree_rss_sampled_mib": round(peak[0] / 2**20, 1) if peak[0] else None,
    }


def run_clam(clam: Path, src_dir: Path, slide_id: str, out: Path) -> dict[str, Any]:
    import h5py

    cmd = [
        sys.executable,
        "create_patches_fp.py",
        "--source",
        str(src_dir),
        "--save_dir",
        str(out),
        "--patch_size",
        "256",
        "--seg",
        "--patch",
        "--stitch",
    ]
    out.mkdir(parents=True)
    res = measure(cmd, clam, out / "run.log")
    h5 = out / "patches" / f"{slide_id}.h5"
    if not h5.exists():  # CLAM reports a failed slide in its CSV and still exits 0
        sys.exit(f"CLAM wrote no {h5}; log:\n{(out / 'run.log').read_text()[-3000:]}")
    with h5py.File(h5, "r") as f:
        res["n_found"] = int(f["coords"].shape[0])
        res["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f["coords"].attrs.items()}
    return res


def run_ours(slide: Path, slide_id: str, out: Path) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("wsi-pipeline")
    out.mkdir(parents=True)
    res = measure([str(exe), "tile", str(slide), "--out", str(out)], out, out / "run.log")
    sidecar = json.loads((out / "tiles" / f"{slide_id}.json").read_text())
    res["n_found"] = int(sidecar["n_tiles"])
    res["geometry"] = sidecar.get("geometry")
    res["tile_slide_seconds"] = sidecar.get("seconds")  # the stage's own timing, without interpreter start/imports
    return res


def _git_head(folder: Path) -> str | None:
    git = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clam", type=Path, required=True, help="CLAM checkout (holds create_patches_fp.py)")
    ap.add_argument("--clam-commit", help="CLAM commit, when --clam is not a git work tree")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each tool (after one warm-up each)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for outputs (default: a temp dir)")
    ap.add_argument("--force-slide", action="store_true", help="rewrite the cached slide")
    args = ap.parse_args()
    clam = args.clam.resolve()
    if not (clam / "create_patches_fp.py").exists():
        sys.exit(f"{clam}: no create_patches_fp.py; pass a CLAM checkout with --clam")

    # in a fresh interpreter, run outside the checkout (as the console script is) so '' on sys.path finds nothing
    probe = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=Path(sys.executable).parent
    )
    if probe.returncode != 0:
        sys.exit(f"import wsi_pipeline.cli failed:\n{probe.stderr[-3000:]}")
    cli_import_s, heavy, package_file = json.loads(probe.stdout.strip().splitlines()[-1])

    slide = ensure_large_slide(SLIDE, params=PARAMS, force=args.force_slide)
    work = Path(tempfile.mkdtemp(prefix="tile_vs_clam_", dir=args.work))
    src_dir = work / "slides"  # CLAM processes every file in --source: only our slide there
    src_dir.mkdir()
    link = src_dir / slide.name
    link.symlink_to(slide)
    slide_id = slide.stem
    tools = {
        "clam": lambda out: run_clam(clam, src_dir, slide_id, out),
        "ours": lambda out: run_ours(link, slide_id, out),
    }

    runs: dict[str, list[dict[str, Any]]] = {"clam": [], "ours": []}
    try:
        for name, fn in tools.items():
            warm = fn(work / f"warmup_{name}")
            print(f"warm-up {name}: {warm['wall_s']:.1f} s, {warm['peak_rss_mib']:.0f} MiB, {warm['n_found']:,}")
            shutil.rmtree(work / f"warmup_{name}")
        for i in range(args.repeats):
            for name in ("clam", "ours") if i % 2 == 0 else ("ours", "clam"):
                out = work / f"{name}_{i}"
                res = tools[name](out)
                res["round"] = i
                runs[name].append(res)
                print(f"round {i} {name}: {res['wall_s']:.1f} s, {res['peak_rss_mib']:.0f} MiB")
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "peak_rss_mib")}
        | {"tree_rss_sampled_mib": statistics.median(r["tree_rss_sampled_mib"] or 0 for r in rs) or None}
        for name, rs in runs.items()
    }
    ratios = {
        "wall": med["ours"]["wall_s"] / med["clam"]["wall_s"],
        "peak_rss": med["ours"]["peak_rss_mib"] / med["clam"]["peak_rss_mib"],
    }
    goals = {
        "wall_met": ratios["wall"] <= GOALS["wall_ratio_max"],
        "peak_rss_met": ratios["peak_rss"] <= GOALS["peak_rss_ratio_max"],
    }
    rows = [
        {
            "tool": name,
            "runs": len(runs[name]),
            "median wall s": med[name]["wall_s"],
            "median peak RSS MiB": med[name]["peak_rss_mib"],
            "median tree RSS MiB (sampled)": med[name]["tree_rss_sampled_mib"],
            "tiles/patches": runs[name][0]["n_found"],
        }
        for name in ("clam", "ours")
    ]
    rows.append(
        {
            "tool": "ours/clam",
            "median wall s": round(ratios["wall"], 3),
            "median peak RSS MiB": round(ratios["peak_rss"], 3),
            "tiles/patches": f"goal wall<=0.5: {goals['wall_met']}, rss<=1.2: {goals['peak_rss_met']}",
        }
    )
    print()
    print_table(
        rows, ["tool", "runs", "median wall s", "median peak RSS MiB", "median tree RSS MiB (sampled)", "tiles/patches"]
    )
    print(f"cli import: {cli_import_s:.3f} s, heavy modules loaded: {heavy or 'none'}")

    path = write_results(
        "tile_vs_clam",
        {
            "slide": {"path": str(slide), "params": PARAMS, "bytes": slide.stat().st_size},
            "clam": {
                "path": str(clam),
                "commit": args.clam_commit or _git_head(clam) or "unknown",
                "preset": "none (script defaults)",
                "command": "create_patches_fp.py --source DIR --save_dir OUT --patch_size 256 --seg --patch --stitch",
            },
            "ours": {
                "command": "wsi-pipeline tile SLIDE --out OUT (defaults)",
                "package": package_file,
                "repo_head": _git_head(Path(__file__).resolve().parents[1]),
                "PYTHONPATH": os.environ.get("PYTHONPATH"),
            },
            "repeats": args.repeats,
            "runs": runs,
            "medians": med,
            "ratios_ours_over_clam": ratios,
            "goals": GOALS | goals,
            "cli_import_seconds": cli_import_s,
            "heavy_modules_loaded": heavy,
            "rss_note": "peak_rss_mib = wait4 ru_maxrss: largest single process of the tree; tree_rss_sampled_mib = "
            "sampled sum of RSS over the tree (over-counts shared pages of forked workers)",
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
