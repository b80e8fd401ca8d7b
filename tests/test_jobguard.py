"""kill -9 of Snakemake must not leave its jobs running: a job started with WSI_PARENT_PID exits when that
process is gone (real processes: a stand-in parent killed with SIGKILL, a job process watching it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOB = """
import time
from wsi_pipeline.jobguard import guard_parent
assert guard_parent(poll_s=0.1) is not None
print("watching", flush=True)
time.sleep(60)
"""


def test_job_exits_when_its_snakemake_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    env = {**os.environ, "WSI_PARENT_PID": str(parent.pid)}
    job = subprocess.Popen(
        [sys.executable, "-c", JOB], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert job.stdout is not None and job.stdout.readline().strip() == "watching"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        started = time.monotonic()
        rc = job.wait(timeout=20)
        assert rc == 1 and time.monotonic() - started < 5
        assert "Snakemake process" in job.stderr.read() if job.stderr else False
    finally:
        for p in (parent, job):
            if p.poll() is None:
                p.kill()


def test_killed_snakemake_takes_its_encode_job_with_it(tmp_path: Path, shared_data: Path) -> None:
    """The whole scenario: kill -9 the Snakemake process while its encode job runs; the job must not live on."""
    for i in range(12):
        (tmp_path / f"s{i:02d}.svs").symlink_to(shared_data / "slides" / "cmu-1-small-region.svs")
    (tmp_path / "cfg.yaml").write_text(
        f"samples: '{tmp_path}/*.svs'\nresults: {tmp_path / 'results'}\nmil:\n  tasks: []\n"
        "encode:\n  num_workers: 0\n  batch_size: 4\n"
    )
    snakemake = Path(sys.executable).with_name("snakemake")
    smk = subprocess.Popen(
        [str(snakemake), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(tmp_path / "cfg.yaml")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        job = _wait_for_process("encode-shard", timeout=240)
        time.sleep(1.0)  # well into its work
        assert _alive(job)
        os.kill(smk.pid, signal.SIGKILL)
        smk.wait()
        deadline = time.monotonic() + 10
        while _alive(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(job), "the encode job outlived its Snakemake process"
    finally:
        if smk.poll() is None:
            smk.kill()


def _wait_for_process(needle: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if needle in cmdline and "-m wsi_pipeline" in cmdline and "/bin/sh" not in cmdline:
                    return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"no {needle} process within {timeout} s")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not reaped it
