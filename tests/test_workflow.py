"""A real Snakemake run of stage 1 on real slides, bad ones included; the CLI writes what the rule writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CLI = Path(sys.executable).with_name("wsi-pipeline")


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "--cores",
        "2",
        "--configfile",
        str(workdir / "cfg.yaml"),
        *args,
    ]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    wd = tmp_path_factory.mktemp("cohort")
    slides = shared_data / "slides"
    shutil.copy(slides / "cmu-1-small-region.svs", wd / "cmu.svs")
    shutil.copy(slides / "tcga-cr-7395-01a-01-ts1.svs", wd / "tcga.svs")
    shutil.copy(slides / "broken.svs", wd / "broken.svs")
    data = (slides / "cmu-1-small-region.svs").read_bytes()
    (wd / "truncated.svs").write_bytes(data[: len(data) * 6 // 10])
    (wd / "empty.svs").write_bytes(b"")
    (wd / "not_dicom").mkdir()
    (wd / "samples.csv").write_text(
        "slide_id,path,mpp,label\n"
        "cmu,cmu.svs,,a\n"
        "tcga_nompp,tcga.svs,,b\n"
        "tcga_mpp,tcga.svs,0.25,b\n"
        "broken,broken.svs,,a\n"
        "truncated,truncated.svs,,a\n"
        "empty,empty.svs,,a\n"
        "folder,not_dicom,,a\n"
        "gone,gone.svs,,a\n"
    )
    # stages 1-2 only: two usable slides are too few for cross-validation (tests/test_workflow_mil.py trains)
    (wd / "cfg.yaml").write_text(f"samples: {wd / 'samples.csv'}\nresults: {wd / 'results'}\nmil:\n  tasks: []\n")
    run = _snakemake(wd)
    assert run.returncode == 0, run.stderr[-3000:]
    (wd / "first_run.log").write_text(run.stdout + run.stderr)
    return wd


def test_report_records_every_slide(cohort_run: Path) -> None:
    report = pd.read_csv(cohort_run / "results" / "report.csv", keep_default_na=False).set_index("slide_id")
    assert set(report.index) == {"cmu", "tcga_nompp", "tcga_mpp", "broken", "truncated", "empty", "folder", "gone"}
    assert report.loc["cmu", "status"] == "ok" and int(report.loc["cmu", "n_tiles"]) > 20
    assert report.loc["tcga_mpp", "status"] == "ok" and report.loc["tcga_mpp", "backend"] == "openslide"
    expected_reasons = {
        "tcga_nompp": "'mpp' column",
        "broken": "not a readable slide",
        "truncated": "truncated",
        "empty": "empty (0 bytes)",
        "folder": "not a DICOM slide",
        "gone": "file not found",
    }
    for sid, text in expected_reasons.items():
        assert report.loc[sid, "status"] == "failed", sid
        assert text in report.loc[sid, "reason"], (sid, report.loc[sid, "reason"])
        assert "\n" not in report.loc[sid, "reason"]
    html = (cohort_run / "results" / "report.html").read_text()
    assert "qc/cmu/thumbnail.png" in html and "FAILED broken" in html
    assert "FAILED gone" in (cohort_run / "first_run.log").read_text()  # the run ends with a failure summary


def test_tile_store_and_qc_of_a_good_slide(cohort_run: Path) -> None:
    res = cohort_run / "results"
    g = zarr.open_group(str(res / "tiles" / "cmu.zarr"), mode="r")
    coords, fractions = g["coords"][:], g["tissue_fraction"][:]
    assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) == g.attrs["n_tiles"]
    assert fractions.dtype == np.float32 and (fractions >= 0.25).all()
    for key in (
        "tile_px",
        "target_mpp",
        "read_level",
        "read_size",
        "slide_mpp",
        "mpp_source",
        "backend",
        "slide_file_size",
        "slide_mtime",
        "package_version",
    ):
        assert key in g.attrs, key
    assert g.attrs["mpp_source"] == "metadata"
    assert zarr.open_group(str(res / "tiles" / "tcga_mpp.zarr"), mode="r").attrs["mpp_source"] == "override"
    for name in ("thumbnail.png", "thumbnail_plain.png", "mask.png", "tissue.geojson"):
        assert (res / "qc" / "cmu" / name).stat().st_size > 0
    geo = json.loads((res / "qc" / "cmu" / "tissue.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert not (res / "tiles" / "broken.zarr").exists()  # a failed slide leaves no store


def test_encode_stage_wrote_features_for_good_slides_only(cohort_run: Path) -> None:
    features = cohort_run / "results" / "features" / "conceptclip"  # the shipped config's encoder (demo model)
    tiles = zarr.open_group(str(cohort_run / "results" / "tiles" / "cmu.zarr"), mode="r")
    store = zarr.open_group(str(features / "cmu.zarr"), mode="r")
    assert store["features"].shape[0] == tiles["coords"].shape[0] and store["features"].dtype == np.float16
    np.testing.assert_array_equal(store["coords"][:], tiles["coords"][:])
    assert np.isfinite(store["features"][:].astype(np.float32)).all()
    assert store.attrs["encoder"] == "conceptclip" and store.attrs["provenance"]["path"].endswith("demo_clip")
    for sid in ("broken", "gone", "tcga_nompp"):
        assert json.loads((features / f"{sid}.json").read_text())["status"] == "skipped"
        assert not (features / f"{sid}.zarr").exists()
    report = pd.read_csv(cohort_run / "results" / "report.csv", keep_default_na=False).set_index("slide_id")
    assert report.loc["cmu", "encode_status"] == "ok" and report.loc["broken", "encode_status"] == "skipped"
    run_config = (cohort_run / "results" / "run_config.yaml").read_text()
    assert "demo_clip" in run_config and str(cohort_run / "samples.csv") in run_config


def test_rerun_does_no_work_and_mpp_change_redoes_one_slide(cohort_run: Path) -> None:
    again = _snakemake(cohort_run, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    sheet = cohort_run / "samples.csv"
    original = sheet.read_text()
    sheet.write_text(original.replace("tcga_nompp,tcga.svs,,b", "tcga_nompp,tcga.svs,0.5,b"))
    try:
        dry = _snakemake(cohort_run, "-n")
        out = dry.stdout + dry.stderr
        assert "tcga_nompp.json" in out and out.count("rule tile:") == 1
    finally:
        sheet.write_text(original)


def test_duplicate_slide_id_stops_before_any_work(tmp_path: Path, cmu_slide: Path) -> None:
    (tmp_path / "samples.csv").write_text(f"slide_id,path\nA,{cmu_slide}\nA,{cmu_slide}\n")
    (tmp_path / "cfg.yaml").write_text(
        f"samples: {tmp_path / 'samples.csv'}\nresults: {tmp_path / 'results'}\nmil:\n  tasks: []\n"
    )
    run = _snakemake(tmp_path)
    assert run.returncode != 0
    assert "duplicate slide_id ['A']" in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_cli_writes_what_the_rule_writes(cohort_run: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [str(CLI), "tile", str(cohort_run / "cmu.svs"), "--out", str(tmp_path), "--slide-id", "cmu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    ours = zarr.open_group(str(tmp_path / "tiles" / "cmu.zarr"), mode="r")
    rule = zarr.open_group(str(cohort_run / "results" / "tiles" / "cmu.zarr"), mode="r")
    np.testing.assert_array_equal(ours["coords"][:], rule["coords"][:])
    np.testing.assert_array_equal(ours["tissue_fraction"][:], rule["tissue_fraction"][:])
    for name in ("qc/cmu/thumbnail.png", "qc/cmu/mask.png", "qc/cmu/tissue.geojson", "tiles/cmu.json"):
        assert (tmp_path / name).exists()


def test_cli_bad_slide_exits_nonzero_with_one_line(tmp_path: Path, broken_slide: Path, tcga_slide: Path) -> None:
    for slide in (broken_slide, tcga_slide, tmp_path / "missing.svs"):
        run = subprocess.run(
            [str(CLI), "tile", str(slide), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 1
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(slide) in lines[0], run.stderr
    ok = subprocess.run(
        [
            str(CLI),
            "tile",
            str(tcga_slide),
            "--out",
            str(tmp_path),
            "--mpp",
            "0.25",
            "--tile-px",
            "224",
            "--target-mpp",
            "1.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    attrs = zarr.open_group(str(tmp_path / "tiles" / "tcga-cr-7395-01a-01-ts1.zarr"), mode="r").attrs
    assert attrs["tile_px"] == 224 and attrs["target_mpp"] == 1.0 and attrs["read_level"] == 1
