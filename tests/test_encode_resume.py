"""A run SIGKILLed mid-slide, then rerun, gives a store bit-identical to an uninterrupted run; two runs started
together on the same output leave one complete, identical store. Real subprocesses, real slides, real Zarr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encode_engine import fresh_results, read_store, temporaries, tiled_synthetic

from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encode.store import StoreLayout, is_complete_store
from wsi_pipeline.encoders import EncoderConfig, register_encoder
from wsi_pipeline.encoders.stain_texture import StainTextureEncoder
from wsi_pipeline.layout import ResultsLayout

LAYOUT = StoreLayout(4, 8)  # tiny shards: the temporary store gets rows after two batches
SLOW = EncoderConfig(name="slow-stain")

SCRIPT = textwrap.dedent("""
    import sys, time
    from wsi_pipeline.encode.engine import encode_slide
    from wsi_pipeline.encoders import EncoderConfig, register_encoder
    from wsi_pipeline.encoders.stain_texture import StainTextureEncoder
    from wsi_pipeline.encode.store import StoreLayout

    results, delay = sys.argv[1], float(sys.argv[2])

    class Slow(StainTextureEncoder):
        def encode_uint8(self, tiles):
            time.sleep(delay)  # slow enough to be killed mid-slide; the numbers are stain-texture's
            return super().encode_uint8(tiles)

    register_encoder("slow-stain", lambda cfg, device: Slow(cfg, device))
    side = encode_slide(results, "synth", EncoderConfig(name="slow-stain"), batch_size=4, device="cpu",
                        layout=StoreLayout(4, 8))
    print("RESULT", side["status"], side["reused"], flush=True)
""")


class _Fast(StainTextureEncoder):
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_encoder("slow-stain", lambda cfg, device: _Fast(cfg, device))  # same numbers, no delay
    return tiled_synthetic(tmp_path_factory.mktemp("synth"), "synth")


@pytest.fixture(scope="module")
def reference(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, dict]:
    results = fresh_results(synth, tmp_path_factory.mktemp("ref"))
    assert encode_slide(results, "synth", SLOW, batch_size=4, device="cpu", layout=LAYOUT)["status"] == "ok"
    return read_store(ResultsLayout(results).feature_store("slow-stain", "synth"))


def _start(results: Path, delay: float, script: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(results), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _assert_same(results: Path, reference: tuple[np.ndarray, np.ndarray, dict]) -> None:
    store = ResultsLayout(results).feature_store("slow-stain", "synth")
    assert is_complete_store(store)
    feats, coords, attrs = read_store(store)
    np.testing.assert_array_equal(feats, reference[0])  # bit for bit
    np.testing.assert_array_equal(coords, reference[1])
    keys = ("encoder", "encoder_config", "dtype", "tiles", "n_tiles", "embed_dim", "layout", "tile_geometry")
    assert {k: attrs[k] for k in keys} == {k: reference[2][k] for k in keys}
    assert temporaries(results) == []


def test_sigkill_mid_slide_then_rerun_is_identical(synth: Path, reference: tuple, tmp_path: Path) -> None:
    results = fresh_results(synth, tmp_path / "r")
    script = tmp_path / "encode.py"
    script.write_text(SCRIPT)
    proc = _start(results, 0.3, script)
    store = ResultsLayout(results).feature_store("slow-stain", "synth")
    deadline = time.monotonic() + 90
    shards: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None and not shards:
        shards = [
            p
            for t in store.parent.glob(store.name + ".tmp-*")
            for p in (t / "features" / "c").rglob("*")
            if p.is_file()
        ]
        time.sleep(0.05)
    assert shards, f"no rows written before the deadline (exit {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not store.exists() and temporaries(results)  # killed mid-slide: only a temporary is left
    side = encode_slide(results, "synth", SLOW, batch_size=4, device="cpu", layout=LAYOUT)
    assert side["status"] == "ok" and not side["reused"]
    _assert_same(results, reference)


def test_two_concurrent_runs_leave_one_identical_store(synth: Path, reference: tuple, tmp_path: Path) -> None:
    results = fresh_results(synth, tmp_path / "r")
    script = tmp_path / "encode.py"
    script.write_text(SCRIPT)
    procs = [_start(results, 0.05, script) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = sorted(line for out in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert lines == ["RESULT ok False", "RESULT ok True"]  # one encoded, the other waited and kept its store
    _assert_same(results, reference)


def test_batch_composition_does_not_change_features_on_cpu(synth: Path, tmp_path: Path) -> None:
    """Per-tile encoders in eval mode on CPU: different batch sizes give bit-identical features (what makes a
    rerun, a split slide or an OOM back-off reproduce an uninterrupted run)."""
    from tiny_models import make_tiny_timm

    cfg = EncoderConfig(name="timm", path=str(make_tiny_timm(tmp_path / "timm")))
    stores = []
    for bs in (1, 7, 32):
        results = fresh_results(synth, tmp_path / f"bs{bs}")
        encode_slide(results, "synth", cfg, batch_size=bs, device="cpu", dtype="float32")
        stores.append(read_store(ResultsLayout(results).feature_store("timm", "synth"))[0])
    assert torch.equal(torch.from_numpy(stores[0]), torch.from_numpy(stores[1]))
    np.testing.assert_array_equal(stores[0], stores[2])
