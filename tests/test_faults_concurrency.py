"""Concurrent writers of one result: temporary names unique per writer (pid + host), clean-up that removes only
temporaries whose writer is gone, and two real `wsi-pipeline tile` processes on one slide and results folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.io.atomic import (
    FOREIGN_STALE_S,
    host_tag,
    is_temporary,
    remove_stale_temporaries,
    temporary_name,
    temporary_writer,
)
from wsi_pipeline.synthetic import write_synthetic_slide

WRITER = """
import sys
from pathlib import Path
from wsi_pipeline.io.atomic import atomic_group, remove_stale_temporaries
final, value = Path(sys.argv[1]), int(sys.argv[2])
for i in range(int(sys.argv[3])):
    remove_stale_temporaries(final)  # what every stage does before writing its store
    with atomic_group(final) as g:
        a = g.create_array("x", shape=(64, 64), dtype="int32", chunks=(4, 64))
        for r in range(0, 64, 4):
            a[r : r + 4] = value
        g.attrs["complete"] = True
"""


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_names_carry_the_writers_pid_and_host(tmp_path: Path) -> None:
    tmp = temporary_name(tmp_path / "s.zarr")
    assert tmp.name.startswith(f"s.zarr.tmp-{os.getpid()}-{host_tag()}-") and is_temporary(tmp)
    assert temporary_writer(tmp) == (os.getpid(), host_tag())
    assert temporary_name(tmp_path / "s.zarr") != tmp  # unique per write, not only per process
    assert temporary_writer(tmp_path / "s.zarr.tmp-999-dead") == (999, None)  # names of older versions


def test_clean_up_removes_only_temporaries_whose_writer_is_gone(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "live": f"s.zarr.tmp-{live.pid}-{host_tag()}-aaaa0001",
            "dead": f"s.zarr.tmp-{dead_pid()}-{host_tag()}-aaaa0002",
            "mine": f"s.zarr.tmp-{os.getpid()}-{host_tag()}-aaaa0003",
            "other host, busy": f"s.zarr.tmp-{live.pid}-elsewhere.example.org-aaaa0004",
            "other host, abandoned": f"s.zarr.tmp-{live.pid}-elsewhere.example.org-aaaa0005",
            "swap trash of an older version": "s.zarr.tmp-old-aaaa0006",
            "older version, dead": f"s.zarr.tmp-{dead_pid()}-aaaa0007",
            "fixed name": "s.zarr.tmp",
        }
        for name in names.values():
            (tmp_path / name / "c").mkdir(parents=True)
            (tmp_path / name / "c" / "0").write_bytes(b"x")
        old = time.time() - FOREIGN_STALE_S - 60
        for p in (tmp_path / names["other host, abandoned"]).rglob("*"):
            os.utime(p, (old, old))
        os.utime(tmp_path / names["other host, abandoned"], (old, old))
        (tmp_path / "s.zarr").mkdir()
        (tmp_path / "s.zarr.json").write_text("{}")  # another output beside it: never a temporary of s.zarr

        removed = {p.name for p in remove_stale_temporaries(final)}
        gone = {"dead", "other host, abandoned", "older version, dead"}
        assert removed == {names[k] for k in gone}
        assert {k for k, n in names.items() if (tmp_path / n).exists()} == set(names) - gone
        assert (tmp_path / "s.zarr").is_dir() and (tmp_path / "s.zarr.json").is_file()
        # After its own write failed, a writer holding the slide's lock also clears its own and nameless ones.
        removed = {p.name for p in remove_stale_temporaries(final, own=True)}
        assert removed == {names[k] for k in ("mine", "fixed name", "swap trash of an older version")}
    finally:
        live.kill()
        live.wait()


def test_concurrent_writers_of_one_store_both_finish_and_leave_it_complete(tmp_path: Path) -> None:
    final = tmp_path / "s.zarr"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(final), str(value), "25"], stderr=subprocess.PIPE, text=True
        )
        for value in (1, 2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    g = zarr.open_group(str(final), mode="r")
    x = np.asarray(g["x"][...])
    assert g.attrs["complete"] is True and x.shape == (64, 64)
    assert len(np.unique(x)) == 1 and int(x[0, 0]) in (1, 2)  # one writer's whole store, never a mix
    assert [p for p in tmp_path.iterdir() if is_temporary(p)] == []


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slide")
    return write_synthetic_slide(folder / "s.svs", width=4096, height=4096, mpp=0.5, seed=1).path


def tile_command(slide: Path, out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "wsi_pipeline", "tile", str(slide), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs(results: Path) -> dict[str, bytes]:
    """Every output file but the sidecar (it records times), by relative path."""
    return {
        str(p.relative_to(results)): p.read_bytes()
        for p in sorted(results.rglob("*"))
        if p.is_file() and p.name != "s.json" and ".locks" not in p.parts and p.parent.name != "s.zarr"
    }


def test_two_tile_commands_on_one_slide_and_folder_both_succeed(slide: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    first = tile_command(slide, reference)
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    expected = outputs(reference)
    assert {"qc/s/thumbnail.png", "qc/s/thumbnail_plain.png", "qc/s/mask.png", "qc/s/tissue.geojson"} <= set(expected)
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        procs = [tile_command(slide, out), tile_command(slide, out)]
        results = [(p.communicate(timeout=300), p.returncode) for p in procs]
        assert [rc for _, rc in results] == [0, 0], [err[-2000:] for (_, err), _ in results]
        assert all("s: ok, 51 tiles" in text for (text, _), _ in results)
        coords = zarr.open_group(str(out / "tiles" / "s.zarr"), mode="r")["coords"][...]
        assert coords.shape == (51, 2)
        got = outputs(out)
        assert got.keys() == expected.keys() and all(got[k] == expected[k] for k in expected if "zarr" not in k)
        assert [p for p in out.rglob("*") if is_temporary(p)] == []
