"""Stage 1 + report through a real SLURM cluster (tests/slurm_cluster.py) with the project's SLURM profile.

Each tile job and the report are sbatch jobs that run `snakemake --executor slurm-jobstep` under srun in the
cohort folder; the evidence that they went through SLURM is slurmctld's own record of each job (state, exit
code, the plugin's rule comment, work dir, memory request) and the per-job logs the plugin writes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from slurm_cluster import (  # noqa: F401 - the fixture is used by name
    BINARIES,
    SlurmCluster,
    SlurmUnavailable,
    missing_binaries,
    slurm_cluster,
    start_cluster,
)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake"
PROFILE = REPO / "workflows" / "profiles" / "slurm"

# Test-only overrides on top of the profile. This cluster has no slurmdbd, so `sacct` cannot answer: status
# comes from squeue (finished jobs stay listed for MinJobAge=600s, above the plugin's 3 x init-seconds floor).
# A 1 s first check keeps the run short; successful jobs' logs are kept as evidence (the default deletes them).
ENCODE_MEM_MB = 3000  # the test node is small: the encode rule's default (16 GB) is lowered on the command line
SLURM_ARGS = (
    "--set-resources",
    f"encode:mem_mb={ENCODE_MEM_MB}",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-keep-successful-logs",
    "--latency-wait",
    "5",
)
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def _snakemake(cluster: SlurmCluster, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "--configfile",
        str(workdir / "cfg.yaml"),
        "--profile",
        str(PROFILE),
        "--jobs",
        "2",
        *SLURM_ARGS,
        *args,
    ]
    # the venv's bin first: the job's snakemake and the `run:` block must import wsi_pipeline from this venv
    env = cluster.env(path_prepend=[VENV_BIN])
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def _all_job_ids(cluster: SlurmCluster) -> list[str]:
    out = cluster.run("squeue", "--states=all", "--noheader", "--format=%i").stdout
    return out.split()


@pytest.fixture(scope="module")
def slurm_run(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
    cmu_slide: Path,
    broken_slide: Path,
) -> tuple[Path, str]:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("snakemake-executor-plugin-slurm is not installed: pip install -e '.[cluster]'", pytrace=False)
    wd = tmp_path_factory.mktemp("slurm_cohort")
    shutil.copy(cmu_slide, wd / "cmu.svs")
    shutil.copy(broken_slide, wd / "broken.svs")
    # relative paths: they must resolve inside the SLURM job, whose working directory is this folder
    (wd / "samples.csv").write_text("slide_id,path\ncmu,cmu.svs\nbroken,broken.svs\n")
    # One reader process: the encode job asks SLURM for num_workers + 1 CPUs and the test node may have only 2.
    (wd / "cfg.yaml").write_text(
        f"samples: {wd / 'samples.csv'}\nresults: {wd / 'results'}\nencode:\n  num_workers: 1\nmil:\n  tasks: []\n"
    )
    run = _snakemake(slurm_cluster, wd)
    log = run.stdout + run.stderr
    (wd / "first_run.log").write_text(log)
    assert run.returncode == 0, log[-4000:] + "\n" + slurm_cluster.log_tail()
    return wd, log


def test_every_job_ran_as_a_slurm_job(slurm_run: tuple[Path, str], slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    wd, log = slurm_run
    submitted = SUBMITTED.findall(log)
    comments = {}
    for job_id, job_log in submitted:
        info = slurm_cluster.job_info(job_id)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert info["Partition"] == "cpu" and info["NodeList"] == slurm_cluster.node
        assert Path(info["WorkDir"]) == wd  # the plugin runs each job in the workflow's folder
        comments[info["Comment"]] = info
        # the plugin's per-job log: snakemake ran inside the allocation, as the jobstep executor
        text = Path(job_log).read_text()
        assert Path(job_log).parent.is_relative_to(wd / ".snakemake" / "slurm_logs")
        assert "--executor slurm-jobstep" in text and "Finished jobid: 0" in text, text[-2000:]
    # one job per slide for tiling, one encode shard, the report (`all` is a local rule); nothing twice
    expected = {"rule_tile_wildcards_cmu", "rule_tile_wildcards_broken", "rule_encode_wildcards_0-of-1", "rule_report"}
    assert expected <= set(comments) and len(comments) == len(submitted), log[-3000:]
    assert comments["rule_tile_wildcards_cmu"]["MinMemoryNode"] == "4000M"  # the rule's mem_mb reached sbatch --mem
    assert comments["rule_encode_wildcards_0-of-1"]["MinMemoryNode"] == f"{ENCODE_MEM_MB}M"  # --set-resources
    logged = {
        p.relative_to(wd / ".snakemake" / "slurm_logs").parts[0]
        for p in (wd / ".snakemake" / "slurm_logs").rglob("*.log")
    }
    assert {"rule_tile", "rule_encode", "rule_report"} <= logged


def test_report_has_good_slide_ok_and_bad_slide_failed(slurm_run: tuple[Path, str]) -> None:
    wd, log = slurm_run
    report = pd.read_csv(wd / "results" / "report.csv", keep_default_na=False).set_index("slide_id")
    assert sorted(report.index) == ["broken", "cmu"]
    assert report.loc["cmu", "status"] == "ok" and int(report.loc["cmu", "n_tiles"]) > 20
    assert report.loc["broken", "status"] == "failed"
    assert "not a readable slide" in report.loc["broken", "reason"]
    assert (wd / "results" / "tiles" / "cmu.zarr").is_dir() and not (wd / "results" / "tiles" / "broken.zarr").exists()
    assert (wd / "results" / "qc" / "cmu" / "thumbnail.png").stat().st_size > 0
    assert "FAILED broken" in log  # the onsuccess failure summary, printed by the submitting snakemake


def test_rerun_submits_nothing(slurm_run: tuple[Path, str], slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    wd, _ = slurm_run
    before = _all_job_ids(slurm_cluster)
    again = _snakemake(slurm_cluster, wd)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "Nothing to be done" in out and not SUBMITTED.search(out)
    assert _all_job_ids(slurm_cluster) == before


def _wait_state(cluster: SlurmCluster, job_id: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.job_info(job_id).get("JobState", "")
        if state in states:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {cluster.job_info(job_id)}")


def test_plugin_squeue_status_query_sees_failed_and_completed_jobs(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The exact status command the plugin runs here (squeue, no accounting) reports finished jobs' states."""
    from snakemake_executor_plugin_slurm.job_status_query import query_job_status_squeue

    name = f"wsitest-{os.getpid()}"
    ids = {}
    for label, script in (("ok", "srun true"), ("bad", "srun sh -c 'exit 3'")):
        ids[label] = slurm_cluster.run(
            "sbatch",
            "--parsable",
            "--job-name",
            name,
            "--mem",
            "100",
            "-o",
            str(tmp_path / f"{label}.log"),
            "--wrap",
            script,
        ).stdout.strip()
    assert _wait_state(slurm_cluster, ids["ok"], {"COMPLETED", "FAILED"}) == "COMPLETED"
    assert _wait_state(slurm_cluster, ids["bad"], {"COMPLETED", "FAILED"}) == "FAILED"
    assert slurm_cluster.job_info(ids["bad"])["ExitCode"] == "3:0"
    out = subprocess.run(
        query_job_status_squeue(name),
        shell=True,
        env=slurm_cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = dict(line.split("|") for line in out.split())
    assert rows == {ids["ok"]: "COMPLETED", ids["bad"]: "FAILED"}
    # without slurmdbd, sacct (the plugin's default status command) cannot answer: why the tests use squeue
    sacct = slurm_cluster.run("sacct", "-X", "--noheader", check=False)
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr


def test_teardown_stops_daemons_and_running_jobs() -> None:
    with start_cluster() as cluster:
        pids = [p.pid for p in cluster.procs.values()]
        job = cluster.run(
            "sbatch", "--parsable", "--mem", "100", "-o", "/dev/null", "--wrap", "srun sleep 987"
        ).stdout.strip()
        _wait_state(cluster, job, {"RUNNING"})
        root = cluster.root
    assert not root.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists() and b"sleep\x00987" in _read(p)]
    assert not leftovers


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_missing_binaries_fail_with_the_install_hint(tmp_path: Path) -> None:
    assert missing_binaries() == []  # this machine ran tests/install_slurm.sh
    assert missing_binaries(str(tmp_path)) == list(BINARIES)
    with pytest.raises(SlurmUnavailable) as err, start_cluster(search_path=str(tmp_path)):
        pass
    message = str(err.value)
    assert "\n" not in message and "tests/install_slurm.sh" in message and "slurmctld" in message


def test_grouped_tiling_runs_many_slides_per_slurm_job(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
    cmu_slide: Path,
) -> None:
    """The README's recipe for large cohorts: tiling alone, `--groups tile=tiling --group-components tiling=N` with
    `--cores`/`--resources` caps, submits N slides as one SLURM job that asks for the caps (not N times a tile job's
    CPUs and memory, which no node has) and runs the slides in layers, its time limit the layers' runtimes summed."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("snakemake-executor-plugin-slurm is not installed: pip install -e '.[cluster]'", pytrace=False)
    for i in range(3):
        shutil.copy(cmu_slide, tmp_path / f"s{i}.svs")
    (tmp_path / "samples.csv").write_text("slide_id,path\n" + "".join(f"s{i},s{i}.svs\n" for i in range(3)))
    (tmp_path / "cfg.yaml").write_text(
        f"samples: {tmp_path / 'samples.csv'}\nresults: {tmp_path / 'results'}\nmil:\n  tasks: []\n"
    )
    cores, mem = min(2, slurm_cluster.cpus), min(8000, slurm_cluster.real_memory_mb)
    run = _snakemake(
        slurm_cluster,
        tmp_path,
        "--until",
        "tile",
        "--groups",
        "tile=tiling",
        "--group-components",
        "tiling=3",
        "--cores",
        str(cores),
        "--resources",
        f"mem_mb={mem}",
        "--set-resources",
        "tile:runtime=5",
        "tile:mem_mb=" + str(mem // cores),
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:] + "\n" + slurm_cluster.log_tail()
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)  # a group job's id is a UUID
    assert len(submitted) == 1, log[-3000:]  # three slides, one SLURM job
    info = slurm_cluster.job_info(submitted[0])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert info["NumCPUs"] == str(cores) and info["MinMemoryNode"] == f"{mem // cores * cores}M", info
    layers = -(-3 // cores)
    assert info["TimeLimit"] == f"00:{5 * layers:02d}:00", info
    for i in range(3):
        assert '"status": "ok"' in (tmp_path / "results" / "tiles" / f"s{i}.json").read_text()
