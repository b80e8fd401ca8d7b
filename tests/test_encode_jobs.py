"""Cohort encode jobs: shards partition the cohort by tile count; a job on the CPU uses the CPU."""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.config import write_run_config
from wsi_pipeline.devices import job_devices
from wsi_pipeline.encode.jobs import shard_slides


def test_shards_partition_the_cohort_and_balance_tiles() -> None:
    counts = {f"s{i}": n for i, n in enumerate([900, 10, 500, 450, 300, 40, 0, 200])}
    shards = [shard_slides(counts, k, 3) for k in range(3)]
    flat = [s for shard in shards for s in shard]
    assert sorted(flat) == sorted(counts)  # every slide exactly once
    loads = [sum(counts[s] for s in shard) for shard in shards]
    assert max(loads) <= 900  # LPT: the biggest slide alone bounds the makespan here
    assert shard_slides(counts, 1, 3) == shards[1]  # deterministic: every job computes the same split


def test_cpu_job_uses_the_cpu(tmp_path: Path) -> None:
    with job_devices(tmp_path, "cpu", gpus=1) as devices:
        assert devices == ["cpu"]
    with job_devices(tmp_path, "cuda:3", gpus=1) as devices:
        assert devices == ["cuda:3"]


def test_run_config_is_rewritten_only_when_it_changes(tmp_path: Path) -> None:
    path = write_run_config({"a": 1}, tmp_path / "run_config.yaml")
    mtime = path.stat().st_mtime_ns
    write_run_config({"a": 1}, path)
    assert path.stat().st_mtime_ns == mtime
    write_run_config({"a": 2}, path)
    assert "a: 2" in path.read_text()


def test_auto_reader_count_follows_the_cpus_the_job_may_use() -> None:
    """num_workers: auto sizes the tile readers from the CPU affinity (a SLURM allocation, taskset), not the
    machine: a job pinned to one CPU reads inline instead of oversubscribing it (torch's warning on 2 cores)."""
    import subprocess
    import sys

    code = (
        "import os\nfrom wsi_pipeline.encode.config import EncodeParams\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "print(EncodeParams().reader_processes(), EncodeParams(num_workers=3).reader_processes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "3"]  # one CPU: no extra readers; an explicit number is kept
