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


def test_empty_glob_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'samples' pattern"):
        cohort_from_glob(str(tmp_path / "*.svs"))


def test_sheet_mpp_range_is_the_range_tiling_accepts(tmp_path: Path) -> None:
    """0.01 um/px was accepted by the sheet and refused only at tiling; now one range, checked before the run."""
    with pytest.raises(ConfigError, match=r"mpp must be .* \[0.05, 50.0\].* row\(s\) 2"):
        read_sample_sheet(_sheet(tmp_path, "slide_id,path,mpp\nA,a.svs,0.01\nB,b.svs,0.05\n"))


def test_glob_derives_valid_ids_from_spaces_and_accents(tmp_path: Path, cmu_slide: Path) -> None:
    import shutil

    from wsi_pipeline.layout import STATUS_OK
    from wsi_pipeline.tiling.stage import tile_slide

    for name in ("my slide (1).svs", "Gewebeprobe_Müller.svs"):
        shutil.copy(cmu_slide, tmp_path / name)
    cohort = cohort_from_glob(str(tmp_path / "*.svs"))
    assert sorted(cohort.index) == ["Gewebeprobe_Muller", "my_slide_1"]
    # the same file through the tile command's default id: the same id as the glob gave it
    side = tile_slide(tmp_path / "my slide (1).svs", tmp_path / "results")
    assert side.slide_id == "my_slide_1" and side.status == STATUS_OK
    assert (tmp_path / "results" / "tiles" / "my_slide_1.zarr").is_dir()
    with pytest.raises(ConfigError, match="pass --slide-id my_slide"):
        tile_slide(tmp_path / "my slide (1).svs", tmp_path / "results", slide_id="my slide")
