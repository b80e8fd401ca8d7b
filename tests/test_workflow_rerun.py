"""A rerun is always right (issue 16), through real Snakemake runs on demo slides: jobs read settings snapshots that
no other invocation can rewrite, a dry run writes nothing, and what is redone follows what changed, with or without
`.snakemake/metadata` (a moved results folder has none)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

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
