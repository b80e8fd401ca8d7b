"""Faults of the disk, on real file systems: a full disk (a small tmpfs), a read-only share (a read-only bind mount),
a results path that is a file. Each ends in one line naming the folder and the fix, with the slide's failure
recorded where it can be written, no temporary left, and finished results still readable."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from wsi_pipeline.config import load_config, write_run_config
from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encoders import EncoderConfig
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.io.atomic import is_temporary
from wsi_pipeline.io.faults import describe_os_error, human_bytes
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.stage import tile_slide

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
STAIN = ["--encoder", "stain-texture", "--device", "cpu", "--num-workers", "0"]


# --- helpers ------------------------------------------------------------------------------------------------------


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`wsi-pipeline ARGS` as its own process: real exit code, real stderr."""
    cmd = [sys.executable, "-m", "wsi_pipeline", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit status 1 and exactly one `error: ...` line on stderr; returns the line's text."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0].removeprefix("error: ")


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temporary(p)]


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); run the tests as root to check it on a real file system")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small file system at `path` (tmpfs of `size`, e.g. "1m"), unmounted afterwards."""
    need_root("a full disk")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def read_only_view(src: Path, at: Path) -> Iterator[Path]:
    """`src` seen read-only at `at` (a read-only bind mount: no write succeeds there, not even root's)."""
    need_root("a read-only folder")
    at.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "--bind", str(src), str(at)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot bind-mount here: {r.stderr.decode().strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(at)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only here: {r.stderr.decode().strip()}")
        assert not os.access(at, os.W_OK) or _write_fails(at)
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


def _write_fails(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except OSError as err:
        return err.errno == errno.EROFS
    return False


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system of `folder` until `leave` bytes are free."""
    st = os.statvfs(folder)
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic slide whose two QC thumbnails (about 0.9 MB each) do not fit in a 1 MB disk."""
    folder = tmp_path_factory.mktemp("slide")
    return write_synthetic_slide(folder / "s.svs", width=4096, height=4096, mpp=0.5, seed=1).path


@pytest.fixture(scope="module")
def finished(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished results folder: the slide tiled and encoded (stain-texture), its run config written."""
    results = tmp_path_factory.mktemp("finished") / "results"
    assert tile_slide(slide, results)["status"] == "ok"
    assert encode_slide(results, "s", EncoderConfig(name="stain-texture"), device="cpu")["status"] == "ok"
    shutil.rmtree(results / "features" / "stain-texture" / ".locks")  # reading it back must not need one
    write_run_config(load_config({"results": str(results)}), results / "run_config.yaml")
    return results


# --- the one line -------------------------------------------------------------------------------------------------


def test_one_line_names_the_folder_the_fault_and_the_fix(tmp_path: Path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")  # write() on an open file names no file
    line = describe_os_error(full, tmp_path, need_bytes=5 * 1024**2)
    assert line.startswith(f"{tmp_path}: no space left on device (")
    assert "free; this slide's outputs need about 5.0 MB): free space there or point --out" in line
    ro = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "tiles" / "s.json.tmp-12-host-ab12cd34"))
    assert describe_os_error(ro) == f"{tmp_path / 'tiles'}: read-only file system (cannot write s.json): " + (
        "point --out (results: in a workflow config) at another folder"
    )
    (tmp_path / "f").write_text("")
    in_the_way = OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "f" / "tiles" / "x"))
    assert describe_os_error(in_the_way).startswith(f"{tmp_path / 'f'}: is a file where a folder is needed")
    assert [human_bytes(n) for n in (0, 980, 3.4 * 1024**2, 120 * 1024**3)] == ["0 B", "980 B", "3.4 MB", "120 GB"]


# --- 5. a full disk -------------------------------------------------------------------------------------------------


def test_tiling_into_a_full_disk_is_one_line_recorded_and_leaves_no_temporary(slide: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        results = disk / "results"
        line = one_line_error(cli("tile", slide, "--out", results))
        assert line.startswith(f"{results}") and "no space left on device (" in line, line
        assert " free; tiling one slide needs up to about 12 MB): free space there or point --out" in line, line
        side = json.loads((results / "tiles" / "s.json").read_text())
        assert side["status"] == "failed" and side["reason"] == line  # the failure is recorded
        assert temporaries(disk) == []  # no half-written PNG stays behind

        shutil.rmtree(results)
        r = cli("tile", slide, "--out", results, "--record-failures")
        assert r.returncode == 0 and "s: failed, 0 tiles" in r.stdout, r.stderr  # the cohort goes on
        assert "no space left on device" in json.loads((results / "tiles" / "s.json").read_text())["reason"]
        assert temporaries(disk) == []


def test_tiling_into_a_disk_with_no_space_at_all_fails_even_with_record_failures(slide: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        line = one_line_error(cli("tile", slide, "--out", disk / "results", "--record-failures"))
        assert "no space left on device (0 B free;" in line, line  # not even the sidecar fits: said, exit 1
        assert temporaries(disk) == [] and not (disk / "results" / "tiles" / "s.json").exists()


def test_encoding_into_a_full_disk_records_the_slide_and_goes_on(finished: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        results = disk / "results"
        shutil.copytree(finished / "tiles", results / "tiles")
        fill(disk, leave=2 * 4096)  # room for the sidecar, not for the feature store
        r = cli("encode", "s", "--out", results, *STAIN, "--record-failures")
        assert r.returncode == 0 and "s: failed" in r.stdout, (r.stdout, r.stderr)
        side = json.loads((results / "features" / "stain-texture" / "s.json").read_text())
        assert side["status"] == "failed" and "no space left on device" in side["reason"]
        assert "this slide's features need about" in side["reason"] and "\n" not in side["reason"]
        assert not (results / "features" / "stain-texture" / "s.zarr").exists() and temporaries(disk) == []
        line = one_line_error(cli("encode", "s", "--out", results, *STAIN))
        assert "no space left on device" in line and temporaries(disk) == []


# --- 6. a read-only share -----------------------------------------------------------------------------------------


def test_finished_results_on_a_read_only_share_can_be_read(finished: Path, tmp_path: Path) -> None:
    with read_only_view(finished, tmp_path / "share") as share:
        r = cli("encode", "s", "--out", share, *STAIN)  # already done: reported, no lock file needed
        assert r.returncode == 0 and "s: ok (existing store kept)" in r.stdout, r.stderr
        assert not (share / "features" / "stain-texture" / ".locks").exists()
        r = cli("report", share, "--encoder", "stain-texture")
        assert r.returncode == 0 and "1 slides: 1 ok" in r.stdout, r.stderr
        warning = r.stderr.strip().splitlines()
        assert len(warning) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"report.csv and report.html not written: {share}: read-only file system" in warning[0]
        assert not (share / "report.csv").exists()
        same = load_config({"results": str(finished)})  # unchanged run config: nothing to write, no error
        assert write_run_config(same, share / "run_config.yaml") == share / "run_config.yaml"


def test_writes_to_a_read_only_share_fail_with_one_line(finished: Path, slide: Path, tmp_path: Path) -> None:
    with read_only_view(finished, tmp_path / "share") as share:
        line = one_line_error(cli("encode", "s", "--out", share, *STAIN, "--force"))
        assert line.startswith(f"{share / 'features' / 'stain-texture'}: read-only file system"), line
        line = one_line_error(cli("tile", slide, "--out", share))
        assert f"{share}" in line and "read-only file system" in line and "point --out" in line, line
        changed = load_config({"results": str(share), "tiling": {"tile_px": 128}})
        with pytest.raises(ConfigError, match="read-only file system") as err:
            write_run_config(changed, share / "run_config.yaml")
        assert str(err.value) == f"{share}: read-only file system (cannot write run_config.yaml): " + (
            "set results: in the config to another folder"
        )


def test_snakemake_dry_run_over_a_read_only_results_folder(slide: Path, tmp_path: Path) -> None:
    need_root("a read-only folder")
    shutil.copy(slide, tmp_path / "s.svs")
    (tmp_path / "samples.csv").write_text("slide_id,path,mpp,label\ns,s.svs,,a\n")
    (tmp_path / "cfg.yaml").write_text(
        f"samples: {tmp_path / 'samples.csv'}\nresults: {tmp_path / 'results'}\n"
        "encoder:\n  name: stain-texture\nencode:\n  num_workers: 0\n  device: cpu\nmil:\n  tasks: []\nexplain: null\n"
    )
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile", str(tmp_path / "cfg.yaml")]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = tmp_path / "results"
    with read_only_view(results, results):  # the same path, now read-only
        dry = subprocess.run([*cmd, "-n"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stderr[-3000:]


# --- 7. a results path that is a file -----------------------------------------------------------------------------


def test_a_results_path_that_is_a_file_is_one_line(slide: Path, finished: Path, tmp_path: Path) -> None:
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder\n")
    expected = f"{afile}: is a file where a folder is needed: move the file away or point --out (results: in a " + (
        "workflow config) at another folder"
    )
    assert one_line_error(cli("tile", slide, "--out", afile)) == expected
    assert one_line_error(cli("encode", "s", "--out", afile, *STAIN)) == expected
    with pytest.raises(ConfigError, match=f"{afile}: is a file where a folder is needed"):
        write_run_config(load_config({"results": str(afile)}), afile / "run_config.yaml")
    r = cli("report", afile)
    assert r.returncode == 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{afile}: is a file where a folder is needed" in r.stderr

    results = tmp_path / "results"
    (results / "qc").mkdir(parents=True)
    (results / "tiles").write_text("")  # a file where stage 1's folder goes
    line = one_line_error(cli("tile", slide, "--out", results))
    assert line.startswith(f"{results / 'tiles'}: is a file where a folder is needed"), line
    (results / "tiles").unlink()
    (results / "qc" / "s").write_text("")  # one output folder is a file: the slide fails, recorded
    r = cli("tile", slide, "--out", results, "--record-failures")
    assert r.returncode == 0 and "s: failed" in r.stdout, r.stderr
    reason = json.loads((results / "tiles" / "s.json").read_text())["reason"]
    assert reason.startswith(f"{results / 'qc' / 's'}: is a file where a folder is needed"), reason
    assert temporaries(results) == []


def test_tile_command_reads_the_config_it_is_given_and_defaults_without(tmp_path: Path) -> None:
    """`tile --config` validates the whole file and uses its tiling section; with no file the defaults are the
    composed config's (taken from the tiling models directly, so a tile job does not build every stage's config)."""
    from wsi_pipeline.config import load_config
    from wsi_pipeline.tiling.config import DEFAULT_BACKEND, TilingParams, TissueParams
    from wsi_pipeline.tiling.table import read_tile_attrs

    defaults = load_config(None)
    assert (defaults.tiling, defaults.tissue, defaults.backend) == (TilingParams(), TissueParams(), DEFAULT_BACKEND)
    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536).path
    r = cli("tile", slide, "--out", tmp_path / "plain")
    assert r.returncode == 0, r.stderr
    assert read_tile_attrs(tmp_path / "plain" / "tiles" / "s.zarr")["tile_px"] == TilingParams().tile_px
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("tiling:\n  tile_px: 128\n  target_mpp: 1.0\n")
    r = cli("tile", slide, "--out", tmp_path / "configured", "--config", cfg)
    assert r.returncode == 0, r.stderr
    attrs = read_tile_attrs(tmp_path / "configured" / "tiles" / "s.zarr")
    assert attrs["tile_px"] == 128 and attrs["target_mpp"] == 1.0
    cfg.write_text("tiling:\n  tile_px: 128\ntilling:\n  tile_px: 64\n")  # a typo'd section is refused, not ignored
    line = one_line_error(cli("tile", slide, "--out", tmp_path / "typo", "--config", cfg))
    assert "tilling" in line and str(cfg) in line
    assert not (tmp_path / "typo" / "tiles" / "s.zarr").exists()
