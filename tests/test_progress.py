"""Progress of long work: plain periodic log lines when not on a terminal (job logs), with rate and time left."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from wsi_pipeline.progress import Progress


def test_log_lines_carry_counts_rate_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsi_pipeline.progress")
    with Progress(100, "s1: tiles", every_s=0.0) as p:
        for _ in range(4):
            p.advance(25)
    lines = [r.getMessage() for r in caplog.records if r.name == "wsi_pipeline.progress"]
    assert lines[0].startswith("s1: tiles: 25/100 tiles,") and "tiles/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("s1: tiles: 100/100 tiles")


def test_encoding_a_slide_reports_progress(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_encode_engine import STAIN, tiled_synthetic

    from wsi_pipeline.encode.engine import encode_slide

    results = tiled_synthetic(tmp_path, "synth")
    caplog.set_level(logging.INFO, logger="wsi_pipeline.progress")
    side = encode_slide(results, "synth", STAIN, device="cpu", batch_size=8)
    lines = [r.getMessage() for r in caplog.records if r.name == "wsi_pipeline.progress"]
    assert (
        lines
        and lines[-1].startswith("synth (encoder stain-texture)")
        and f"{side.n_tiles}/{side.n_tiles}" in lines[-1]
    )
