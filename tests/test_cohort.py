"""Sample sheet and glob cohorts: validation messages and path handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline.config import load_config
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.slide.cohort import cohort_from_glob, read_sample_sheet


def _sheet(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "samples.csv"
    p.write_text(text)
    return p


def test_valid_sheet_resolves_relative_paths(tmp_path: Path, cmu_slide: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.svs").write_bytes(cmu_slide.read_bytes())
    sheet = read_sample_sheet(_sheet(tmp_path, "slide_id,path,mpp,label\nA,s/a.svs,0.5,tumour\n"))
    assert sheet.loc["A", "path"] == str((tmp_path / "s" / "a.svs").resolve())
    assert sheet.loc["A", "mpp"] == 0.5
    assert sheet.loc["A", "patient_id"] == "A"  # defaults to the slide id
    assert sheet.loc["A", "label"] == "tumour"  # label columns pass through


def test_duplicate_ids_are_one_error_listing_them(tmp_path: Path) -> None:
    p = _sheet(tmp_path, "slide_id,path\nA,a.svs\nB,b.svs\nA,c.svs\n")
    with pytest.raises(ConfigError) as err:
        read_sample_sheet(p)
    msg = str(err.value)
    assert "duplicate slide_id ['A']" in msg and "rows 2, 4" in msg and str(p) in msg and "\n" not in msg


def test_bad_values(tmp_path: Path) -> None:
    p = _sheet(tmp_path, "slide_id,path,mpp\nA,a.svs,abc\nB,b.svs,-1\nC,,0.5\nD E,d.svs,\n")
    with pytest.raises(ConfigError) as err:
        read_sample_sheet(p)
    msg = str(err.value)
    assert "mpp must be microns per pixel" in msg and "row(s) 2, 3" in msg
    assert "empty path on row(s) 4" in msg
    assert "'D E'" in msg


def test_missing_columns_and_missing_sheet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing column"):
        read_sample_sheet(_sheet(tmp_path, "id,file\nA,a.svs\n"))
    with pytest.raises(ConfigError, match="sample sheet not found"):
        read_sample_sheet(tmp_path / "nope.csv")


def test_missing_file_is_kept_for_the_report(tmp_path: Path) -> None:
    sheet = read_sample_sheet(_sheet(tmp_path, "slide_id,path\nA,gone.svs\n"))
    assert list(sheet.index) == ["A"]  # not dropped: the tile rule records it as failed


def test_glob_cohort(shared_data: Path) -> None:
    cohort = cohort_from_glob(str(shared_data / "slides" / "*.svs"))
    assert set(cohort.index) == {"broken", "cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"}
    with pytest.raises(ConfigError, match="no slides match"):
        cohort_from_glob(str(shared_data / "slides" / "*.ndpi"))


def test_config_errors_are_one_line(tmp_path: Path, shared_data: Path) -> None:
    SLIDES_GLOB = shared_data / "slides" / "*.svs"
    with pytest.raises(ConfigError) as err:
        load_config({"samples": "x.csv", "tiling": {"tile_px": -3, "bogus": 1}})
    msg = str(err.value)
    assert "tiling.tile_px" in msg and "tiling.bogus" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="'samples' is not set"):
        load_config({}).cohort()
    assert len(load_config({"samples": str(SLIDES_GLOB)}).cohort()) == 3
