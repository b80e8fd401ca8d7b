"""Which device a job computes on: resolving `auto`/`cuda`/`cuda:N`, and taking GPUs nobody else holds.

Snakemake's `--resources gpu=N` only counts GPUs; it never says which one a job may use. `acquire_gpu` takes an
exclusive lock on `RESULTS/.gpu_locks/{i}.lock` for the job's lifetime (the kernel drops it when the process
dies, even on SIGKILL, so a crashed job never strands a device). Under a cluster executor the job uses the GPUs
it was given (CUDA_VISIBLE_DEVICES). torch is imported only when a device is actually resolved.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PipelineError
from .io.locks import file_lock
from .layout import ResultsLayout

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch reads it. One rule for every stage."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cuda_present() -> bool:
    """Whether this machine shows an NVIDIA GPU, without importing torch (for building the workflow's DAG)."""
    visible = visible_gpus()
    if visible is not None:
        return len(visible) > 0
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def visible_gpus() -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries when set by the caller/cluster, else None."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None or value.strip() == "":
        return None
    return [v.strip() for v in value.split(",") if v.strip() and v.strip() != "-1"]


@contextlib.contextmanager
def acquire_gpu(
    results: str | os.PathLike[str], n_gpus: int | None = None, *, poll_s: float = 0.2, timeout_s: float | None = None
) -> Iterator[int]:
    """Yield a CUDA device index no other holder has, for as long as the `with` block runs.

    When CUDA_VISIBLE_DEVICES names exactly one device (a cluster executor assigned it), yield 0 without
    locking. Otherwise lock one of `n_gpus` ids (default: the visible/installed count) under
    `results/.gpu_locks`; wait for one to free up if all are held."""
    visible = visible_gpus()
    if visible is not None and len(visible) == 1:
        yield 0
        return
    if n_gpus is None:
        if visible is not None:
            n_gpus = len(visible)
        else:
            import torch

            n_gpus = torch.cuda.device_count()
    if n_gpus < 1:
        raise PipelineError(
            "acquire_gpu: no GPU available (CUDA_VISIBLE_DEVICES empty or no CUDA device); "
            "run on a GPU node or set encode.device: cpu"
        )
    lock_dir = ResultsLayout(results).gpu_locks
    # The lock is per physical device: ids name the same GPUs for every job of one results folder.
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for i in range(n_gpus):
            with file_lock(lock_dir / f"{i}.lock", blocking=False) as held:
                if held:
                    yield i
                    return
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError(
                f"acquire_gpu: all {n_gpus} GPU locks in {lock_dir} stayed busy for {timeout_s} s; "
                "run snakemake with --resources gpu=N no larger than the number of GPUs"
            )
        time.sleep(poll_s)


@contextlib.contextmanager
def job_devices(results: str | os.PathLike[str], device: str, gpus: int = 1) -> Iterator[list[str]]:
    """The devices one job may use, held for the `with` block: `gpus` free GPUs when `device` is cuda (or auto on a
    GPU machine), the GPUs a cluster executor assigned, an explicit `cuda:N`, or the CPU."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        yield ["cpu"]
        return
    if device.startswith("cuda:"):
        yield [device]
        return
    visible = visible_gpus()
    if visible is not None and 1 <= len(visible) <= gpus:  # a cluster executor gave us exactly our GPUs
        yield [f"cuda:{i}" for i in range(len(visible))]
        return
    with contextlib.ExitStack() as stack:
        ids = [stack.enter_context(acquire_gpu(results)) for _ in range(gpus)]
        yield [f"cuda:{i}" for i in ids]
