"""A workflow job dies with the Snakemake process that started it.

`kill -9` of Snakemake leaves its running jobs behind: an orphaned encode job keeps the GPU and its slide locks
and races the rerun. The workflow starts every job with WSI_PARENT_PID set to Snakemake's pid; the CLI then
watches that process and, when it is gone, stops the job's own child processes and exits. Nothing is corrupted:
every store is written under a temporary name and locks are released by the kernel; the rerun redoes the slides
that were in flight (after `snakemake --unlock`, which a killed Snakemake always needs).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

ENV = "WSI_PARENT_PID"
POLL_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _watch(pid: int, poll_s: float) -> None:
    while _alive(pid):
        time.sleep(poll_s)
    sys.stderr.write(f"error: the Snakemake process {pid} that started this job is gone; stopping the job\n")
    sys.stderr.flush()
    for child in multiprocessing.active_children():  # device workers, data-loader workers
        child.terminate()
    os._exit(1)  # from a watcher thread: the only way to end the process now; stores are temporary until complete


def export_parent_pid() -> None:
    """Called where the workflow is read: jobs started from this process (which inherit the environment) will
    watch it. An environment variable, not part of the jobs' commands, so their code stays the same run to run."""
    os.environ[ENV] = str(os.getpid())


def guard_parent(poll_s: float = POLL_S) -> int | None:
    """Start the watcher when WSI_PARENT_PID names a process; returns that pid (None when not set)."""
    value = os.environ.get(ENV, "")
    if not value.isdigit():
        return None
    pid = int(value)
    if pid == os.getpid() or not _alive(pid):
        return None
    threading.Thread(target=_watch, args=(pid, poll_s), daemon=True, name="parent-watch").start()
    return pid
