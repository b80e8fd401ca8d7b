"""A slide replaced under the same name, with its old date kept (cp -p, rsync -a, tar x, a backup restore), is
noticed by its content fingerprint: by the workflow (which redoes the slide and what follows) and by stage 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encoders import EncoderConfig
from wsi_pipeline.layout import STATUS_FAILED, STATUS_OK
from wsi_pipeline.slide.fingerprint import content_fingerprint, current_fingerprint, slide_fingerprint, stat_stamp
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.stage import tile_slide

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def replace_keeping_date(target: Path, source: Path) -> None:
    """What `cp -p` does: the other file's bytes under the old name, with the old modification time."""
    st = target.stat()
    shutil.copyfile(source, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_fingerprint_tells_files_apart_and_skips_reading_unchanged_ones(tmp_path: Path, shared_data: Path) -> None:
    cmu = tmp_path / "a.svs"
    shutil.copy2(shared_data / "slides" / "cmu-1-small-region.svs", cmu)
    twin = tmp_path / "twin.svs"
    shutil.copy2(cmu, twin)
    recorded = slide_fingerprint(cmu)
    assert content_fingerprint(twin) == recorded["fingerprint"]  # same bytes, other file: same slide
    assert current_fingerprint(cmu, recorded) == recorded["fingerprint"]

    old_mtime = cmu.stat().st_mtime_ns
    replace_keeping_date(cmu, shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs")
    assert cmu.stat().st_mtime_ns == old_mtime  # the date a size+mtime check would trust
    assert current_fingerprint(cmu, recorded) != recorded["fingerprint"]

    # the stat stamp says "not rewritten": the recorded value is returned without reading the file
    unreadable = {**slide_fingerprint(twin), "fingerprint": "recorded-value"}
    assert current_fingerprint(twin, unreadable) == "recorded-value"
    assert stat_stamp(twin)["size"] == twin.stat().st_size


def test_encode_refuses_a_slide_replaced_since_tiling(tmp_path: Path, shared_data: Path) -> None:
    slide = tmp_path / "s.svs"
    shutil.copy2(shared_data / "slides" / "cmu-1-small-region.svs", slide)
    results = tmp_path / "results"
    assert tile_slide(slide, results).status == STATUS_OK
    # same size on purpose: a truncated-then-padded copy of another slide defeats a size check
    other = (shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs").read_bytes()
    size = slide.stat().st_size
    st = slide.stat()
    slide.write_bytes((other * (size // len(other) + 1))[:size])
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    side = encode_slide(results, "s", EncoderConfig(name="stain-texture"), device="cpu")
    assert side.status == STATUS_FAILED
    assert "not the slide that was tiled" in side.reason and "wsi-pipeline tile" in side.reason
    assert not (results / "features" / "stain-texture" / "s.zarr").exists()


@pytest.mark.slow
def test_workflow_redoes_a_slide_replaced_with_its_old_date(tmp_path: Path, shared_data: Path) -> None:
    slides = shared_data / "slides"
    shutil.copy2(slides / "cmu-1-small-region.svs", tmp_path / "a.svs")
    shutil.copy2(slides / "cmu-1-small-region.svs", tmp_path / "b.svs")
    (tmp_path / "samples.csv").write_text("slide_id,path\na,a.svs\nb,b.svs\n")
    (tmp_path / "cfg.yaml").write_text(
        f"samples: {tmp_path / 'samples.csv'}\nresults: {tmp_path / 'results'}\nmil:\n  tasks: []\n"
        "encode:\n  num_workers: 0\n"
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", "cfg.yaml", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    sidecar = tmp_path / "results" / "tiles" / "b.json"
    before = json.loads(sidecar.read_text())
    assert "Nothing to be done" in run("-n").stdout + run("-n").stderr  # unchanged slides: nothing reruns

    other = tmp_path / "other.svs"
    write_synthetic_slide(other, width=3000, height=2000, mpp=0.5, fmt="svs", seed=3)
    replace_keeping_date(tmp_path / "b.svs", other)
    dry = run("-n")
    assert "tile" in dry.stdout and "slide_id=b" in dry.stdout, dry.stdout[-2000:]
    assert "slide_id=a" not in dry.stdout  # only the replaced slide is redone
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    after = json.loads(sidecar.read_text())
    assert after["slide_fingerprint"]["fingerprint"] != before["slide_fingerprint"]["fingerprint"]
    assert after["slide"]["dimensions"] == [3000, 2000] != before["slide"]["dimensions"]  # the new slide's tiles
    encoded = json.loads((tmp_path / "results" / "features" / "conceptclip" / "b.json").read_text())
    assert encoded["status"] == "ok" and encoded["n_tiles"] == after["n_tiles"]  # re-encoded from the new tiles
