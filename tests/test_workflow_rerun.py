"""A rerun is always right (issue 16), through real Snakemake runs on demo slides: jobs read settings snapshots that
no other invocation can rewrite, a dry run writes nothing, and what is redone follows what changed, with or without
`.snakemake/metadata` (a moved results folder has none)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.job_kill import run_and_kill_job

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
DEMO = REPO / "workflows" / "demo"
EPOCHS = 4
CONFIG = """samples: {samples}
results: {results}
encode:
  num_workers: 0
explain: null
mil:
  tasks:
    - {{name: cls, type: classification, label: label}}
    - {{name: surv, type: survival, time: time, event: event}}
  train: {{folds: 2, epochs: {epochs}, patience: {epochs}, bootstrap: 10, quiet: true, hidden_dim: 16, attn_dim: 16}}
  heatmap_top_k: 2
"""


def snakemake(wd: Path, *args: str, config: str = "cfg.yaml", wait: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(wd / config), *args]
    return subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=600)


def write_config(
    wd: Path, name: str, results: Path, epochs: int = EPOCHS, extra: str = "", samples: Path | None = None
) -> None:
    sheet = samples or wd / "samples.csv"
    (wd / name).write_text(CONFIG.format(samples=sheet, results=results, epochs=epochs) + extra)


def job_counts(output: str) -> dict[str, int]:
    """The dry run's `Job stats` table as {rule: jobs}."""
    lines = output[output.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def files_and_dates(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 demo slides, 8 patients (4 per class), two tasks, 2 folds each: a whole run in well under a minute."""
    wd = tmp_path_factory.mktemp("rerun")
    sheet = pd.read_csv(DEMO / "samples.csv")
    sheet = sheet[sheet["slide_id"].isin([f"demo_{i:03d}" for i in range(12)])].copy()
    sheet["path"] = [str(DEMO / p) for p in sheet["path"]]
    sheet.sample(frac=1.0, random_state=3).to_csv(wd / "samples.csv", index=False)  # rows in no particular order
    write_config(wd, "cfg.yaml", wd / "results")
    run = snakemake(wd)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return wd


def test_a_dry_run_writes_nothing(small_run: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(small_run / "samples.csv", fresh / "samples.csv")
    write_config(fresh, "cfg.yaml", fresh / "results")
    dry = snakemake(fresh, "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert not (fresh / "results").exists()
    # over finished results, with other settings: not one file written or touched
    write_config(small_run, "other.yaml", small_run / "results", epochs=1)
    before = files_and_dates(small_run / "results")
    again = snakemake(small_run, "-n", config="other.yaml")
    assert again.returncode == 0 and "mil_train" in again.stdout
    assert files_and_dates(small_run / "results") == before
    same = snakemake(small_run, "-n")
    assert "Nothing to be done" in same.stdout + same.stderr


def test_a_second_invocation_never_changes_a_running_runs_settings(small_run: Path) -> None:
    results = small_run / "results"
    write_config(small_run, "other.yaml", results, epochs=1)
    log = results / "logs" / "mil" / "cls_fold00.log"
    started = time.time()
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "1", "--configfile", str(small_run / "cfg.yaml")]
    first = subprocess.Popen(
        [*cmd, "--forcerun", "mil_train"], cwd=small_run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        while not (log.exists() and log.stat().st_mtime > started) and first.poll() is None:
            time.sleep(0.2)  # the first fold job has started
        second = snakemake(small_run, "-n", config="other.yaml")  # parses the workflow with epochs: 1
        assert second.returncode == 0, second.stderr[-2000:]
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    for metrics in sorted(results.glob("mil/*/fold*/metrics.json")):
        assert json.loads(metrics.read_text())["epochs_run"] == EPOCHS, metrics
    assert "Nothing to be done" in (snakemake(small_run, "-n").stdout)


def test_changing_epochs_redoes_training_only(small_run: Path) -> None:
    write_config(small_run, "other.yaml", small_run / "results", epochs=1)
    dry = snakemake(small_run, "-n", config="other.yaml")
    counts = job_counts(dry.stdout)
    assert counts["mil_train"] == 4 and counts["run_settings"] == 2  # the two tasks' snapshots
    assert set(counts) <= {"run_settings", "mil_sheet", "mil_splits", "mil_train", "mil_evaluate", "tasks_table", "all"}


def test_a_moved_results_folder_redoes_changed_tiling_without_metadata(small_run: Path, tmp_path: Path) -> None:
    wd = tmp_path / "elsewhere"  # another working directory: no .snakemake/metadata for these results
    wd.mkdir()
    sheet = small_run / "samples.csv"  # the sample sheet stays where it is; the results folder moves
    subprocess.run(["cp", "-a", str(small_run / "results"), str(wd / "results")], check=True)  # dates kept
    write_config(wd, "cfg.yaml", wd / "results", samples=sheet)
    same = snakemake(wd, "-n")
    assert "Nothing to be done" in same.stdout + same.stderr, same.stdout[-3000:]
    write_config(wd, "cfg.yaml", wd / "results", extra="tiling:\n  target_mpp: 1.0\n", samples=sheet)
    changed = snakemake(wd, "-n")
    counts = job_counts(changed.stdout)
    assert counts["tile"] == 12 and counts["encode"] == 1 and counts["mil_train"] == 4
    # the real run: every tile and feature store now records the new resolution
    run = snakemake(wd)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    for sidecar in (wd / "results" / "features" / "conceptclip").glob("*.json"):
        assert json.loads(sidecar.read_text())["status"] == "ok"
    tiles = json.loads((wd / "results" / "tiles" / "demo_000.json").read_text())
    assert tiles["tiling"]["target_mpp"] == tiles["geometry"]["target_mpp"] == 1.0
    # and back to 0.5, metadata gone again: the 0.5 snapshot was superseded when the 1.0 run started, so the work
    # is redone rather than taken for done
    shutil.rmtree(wd / ".snakemake")
    write_config(wd, "cfg.yaml", wd / "results", samples=sheet)
    back = job_counts(snakemake(wd, "-n").stdout)
    assert back["tile"] == 12


def copy_of_run(small_run: Path, tmp_path: Path, name: str) -> Path:
    """The finished run in another folder with its own sample sheet (dates kept, no .snakemake/metadata)."""
    wd = tmp_path / name
    wd.mkdir()
    shutil.copy(small_run / "samples.csv", wd / "samples.csv")
    subprocess.run(["cp", "-a", str(small_run / "results"), str(wd / "results")], check=True)
    write_config(wd, "cfg.yaml", wd / "results")
    return wd


def test_a_slide_removed_from_the_sheet_leaves_no_trace(small_run: Path, tmp_path: Path) -> None:
    wd = copy_of_run(small_run, tmp_path, "removed")
    sheet = pd.read_csv(wd / "samples.csv")
    sheet[sheet["slide_id"] != "demo_011"].to_csv(wd / "samples.csv", index=False)
    run = snakemake(wd)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    results = wd / "results"
    for task in ("cls", "surv"):
        assert not (results / "attention" / task / "demo_011.zarr").exists()
        assert "demo_011" not in json.loads((results / "mil" / task / "heatmaps" / "index.json").read_text())
        assert not list((results / "mil" / task / "heatmaps").glob("demo_011_*"))
        tested = pd.concat(pd.read_csv(p) for p in (results / "mil" / task).glob("fold*/predictions.csv"))
        assert "demo_011" not in ";".join(tested["slide_ids"])


def test_bad_labels_and_damaged_stores_stop_the_task_with_the_reason_on_the_console(
    small_run: Path, tmp_path: Path
) -> None:
    wd = copy_of_run(small_run, tmp_path, "bad")
    sheet = pd.read_csv(wd / "samples.csv")
    sheet["dx"] = ["tumor" if label else "normal" for label in sheet["label"]]
    sheet.loc[sheet["slide_id"] == "demo_005", "dx"] = "tumour"
    sheet.loc[sheet["slide_id"] == "demo_010", "dx"] = None  # blank: left out, with the reason
    sheet.to_csv(wd / "samples.csv", index=False)
    extra = "    - {name: dx, type: classification, label: dx}\n"
    text = (wd / "cfg.yaml").read_text().replace("  train:", extra + "  train:", 1)
    (wd / "cfg.yaml").write_text(text)
    run = snakemake(wd, "--keep-going")
    assert run.returncode != 0
    console = run.stdout + run.stderr
    line = next(x for x in console.splitlines() if "look like one class written two ways" in x)
    assert "'tumor' (" in line and "'tumour' (1; 'tumour' on demo_005)" in line and "(log: " in line
    excluded = pd.read_csv(wd / "results" / "mil" / "dx" / "excluded.csv").set_index("slide_id")
    assert excluded.loc["demo_010", "reason"] == "no value in column 'dx' for task 'dx'"
    # the typo fixed, two feature stores damaged: one line names both
    sheet.loc[sheet["slide_id"] == "demo_005", "dx"] = "tumor"
    sheet.to_csv(wd / "samples.csv", index=False)
    features = wd / "results" / "features" / "conceptclip"
    for sid in ("demo_003", "demo_007"):
        chunk = next(p for p in (features / f"{sid}.zarr" / "features").rglob("*") if p.is_file() and p.stat().st_size)
        chunk.write_bytes(b"\x00garbage" * 8)
    run = snakemake(wd, "--keep-going")
    console = run.stdout + run.stderr
    assert run.returncode != 0
    line = next(x for x in console.splitlines() if "store(s) cannot be trained on" in x)
    assert "2 store(s)" in line and "demo_003 (" in line and "demo_007 (" in line


def test_kill_9_of_a_training_job_then_a_plain_rerun_gives_the_uninterrupted_results(
    small_run: Path, tmp_path: Path
) -> None:
    wd = copy_of_run(small_run, tmp_path, "killed")
    results = wd / "results"
    for metrics in results.glob("mil/*/fold*/metrics.json"):
        metrics.unlink()  # every fold trains again in this copy
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(wd / "cfg.yaml")]
    pattern = f"mil-train --config {results}/settings/task-cls-.* --task cls --fold 01"
    killed, status, out = run_and_kill_job(cmd, wd, pattern, after_s=1.0)  # let it train for a moment
    assert killed and status != 0, out[-3000:]
    assert not (results / "mil" / "cls" / "fold01").exists() or not list(results.glob("mil/cls/fold01/metrics.json"))
    again = snakemake(wd)  # the README's recovery: the same command again
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    for task in ("cls", "surv"):
        summary = (results / "mil" / task / "summary.json").stat().st_mtime_ns
        for fold in ("fold00", "fold01"):
            assert (results / "mil" / task / fold / "metrics.json").stat().st_mtime_ns <= summary
            mine = pd.read_csv(results / "mil" / task / fold / "predictions.csv")
            reference = pd.read_csv(small_run / "results" / "mil" / task / fold / "predictions.csv")
            pd.testing.assert_frame_equal(mine, reference, check_exact=False, rtol=1e-5)


def test_a_replaced_slide_or_a_new_mpp_is_retiled_without_metadata(small_run: Path, tmp_path: Path) -> None:
    wd = tmp_path / "own_slides"
    (wd / "slides").mkdir(parents=True)
    sheet = pd.read_csv(small_run / "samples.csv")
    for sid in ("demo_004", "demo_005"):  # this cohort's own copies of two slides
        shutil.copy2(DEMO / "slides" / f"{sid}.svs", wd / "slides" / f"{sid}.svs")
        sheet.loc[sheet["slide_id"] == sid, "path"] = str(wd / "slides" / f"{sid}.svs")
    sheet.to_csv(wd / "samples.csv", index=False)
    subprocess.run(["cp", "-a", str(small_run / "results"), str(wd / "results")], check=True)
    write_config(wd, "cfg.yaml", wd / "results")
    run = snakemake(wd)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    shutil.rmtree(wd / ".snakemake")  # as after a move, a copy to a cluster or a restore
    assert "Nothing to be done" in snakemake(wd, "-n").stdout
    # demo_004 replaced by other content under its name and date; demo_007 given an MPP in the sheet
    target = wd / "slides" / "demo_004.svs"
    stamp = target.stat()
    target.write_bytes((wd / "slides" / "demo_005.svs").read_bytes())
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    sheet["mpp"] = [0.5 if sid == "demo_007" else None for sid in sheet["slide_id"]]
    sheet.to_csv(wd / "samples.csv", index=False)
    shutil.rmtree(wd / ".snakemake", ignore_errors=True)
    dry = snakemake(wd, "-n")
    counts = job_counts(dry.stdout)
    assert counts["tile"] == 2 and counts["redo_marker"] == 2, dry.stdout[-3000:]
    assert "demo_004.json" in dry.stdout and "demo_007.json" in dry.stdout
    run = snakemake(wd)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    again = snakemake(wd, "-n")
    assert "Nothing to be done" in again.stdout, again.stdout[-3000:]
    assert json.loads((wd / "results" / "tiles" / "demo_007.json").read_text())["mpp_override"] == 0.5
