"""Start a real Snakemake run and `kill -9` one of its jobs once it is running (tests of recovery after a kill)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def run_and_kill_job(cmd: list[str], cwd: Path, pattern: str, after_s: float) -> tuple[bool, int, str]:
    """Run `cmd`; when a process whose command line matches `pattern` (pgrep -f) has run `after_s` seconds, kill -9
    it. Returns (whether a job was killed, Snakemake's exit status, its output)."""
    run = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    try:
        deadline = time.time() + 300
        while not killed and run.poll() is None and time.time() < deadline:
            found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
            if found:
                time.sleep(after_s)
                subprocess.run(["kill", "-9", *found])
                killed = True
            time.sleep(0.05)
        out, _ = run.communicate(timeout=600)
    finally:
        run.kill()
    return killed, run.returncode, out
