"""The machine a benchmark or a run used: one record, so every results JSON names its hardware the same way."""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: SLURM's allocation, taskset, a container's cpuset), not the
    machine's count: what worker pools are sized by."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict[str, Any]:
    """Host, CPU, Python/torch versions and the compute device (`device`, else CUDA 0 when present, else cpu)."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        import torch
    except ImportError:
        return info | {"device": device or "cpu", "device_name": info["cpu_model"]}
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    info |= {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else info["cpu_model"],
    }
    if cuda:
        info["cuda"] = torch.version.cuda
    return info
