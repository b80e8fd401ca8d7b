"""What every benchmark records: the machine it ran on, and a results JSON beside a printed table."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from wsi_pipeline.machine import machine_info

# WSI_BENCH_RESULTS redirects the JSON (benchmarks/gpu/run_pending.sh points it at the device's $OUT)
RESULTS = Path(os.environ.get("WSI_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}_{socket.gethostname()}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), **payload}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
