"""io/small_zarr.py writes Zarr v3 groups that zarr itself reads back exactly as the stores zarr writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_pipeline.io.atomic import is_temporary
from wsi_pipeline.io.small_zarr import write_small_group
from wsi_pipeline.tiling.table import read_tile_table, write_tile_table


def _arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "coords": rng.integers(-(2**40), 2**40, size=(n, 2), dtype=np.int64),
        "tissue_fraction": rng.random(n, dtype=np.float32),
        "flags": rng.random(n) > 0.5,
        "levels": rng.integers(0, 255, size=(n, 3), dtype=np.uint8),
    }


@pytest.mark.parametrize(("n", "rows"), [(0, 1), (1, 1), (7, 3), (1000, 256), (1000, 1000), (5, 64)])
def test_zarr_reads_what_zarr_would_have_written(tmp_path: Path, n: int, rows: int) -> None:
    arrays = _arrays(n)
    attrs = {"slide_id": "s1", "n_tiles": n, "nested": {"a": [1, 2.5, None], "b": "µm"}}
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    write_small_group(ours, arrays, dict.fromkeys(arrays, rows), attrs)
    g = zarr.open_group(str(theirs), mode="w", zarr_format=3)
    for name, values in arrays.items():
        g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(rows, *values.shape[1:]))[...] = values
    g.update_attributes(attrs)

    mine, ref = zarr.open_group(str(ours), mode="r"), zarr.open_group(str(theirs), mode="r")
    assert dict(mine.attrs) == dict(ref.attrs) == attrs
    assert sorted(mine.array_keys()) == sorted(ref.array_keys()) == sorted(arrays)
    for name, values in arrays.items():
        a, b = mine[name], ref[name]
        assert (a.shape, a.dtype, a.chunks, a.fill_value) == (b.shape, b.dtype, b.chunks, b.fill_value)
        np.testing.assert_array_equal(a[...], values)
        if n:  # a row range that crosses chunks, and the last (padded) chunk
            np.testing.assert_array_equal(a[n // 3 : n], values[n // 3 : n])
    assert not [p for p in tmp_path.iterdir() if is_temporary(p)]


def test_tile_table_round_trip_through_zarr(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [512, 0], [1024, 512]], dtype=np.int64)
    fractions = np.array([0.25, 1.0, 0.5], dtype=np.float32)
    store = tmp_path / "tiles" / "s.zarr"
    write_tile_table(store, coords, fractions, {"slide_id": "s", "tile_px": 256, "mpp": np.float64(0.5)})
    table = read_tile_table(store)
    np.testing.assert_array_equal(table.coords, coords)
    np.testing.assert_array_equal(table.tissue_fraction, fractions)
    assert table.attrs["n_tiles"] == 3 and table.attrs["mpp"] == 0.5 and table.attrs["tile_px"] == 256
    meta = json.loads((store / "coords" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "int64"


def test_a_failed_write_leaves_the_old_store_and_no_temporary(tmp_path: Path) -> None:
    store = tmp_path / "t.zarr"
    write_small_group(store, {"x": np.arange(4)}, {"x": 2}, {"version": 1})
    with pytest.raises(TypeError, match="not written"):
        write_small_group(store, {"x": np.arange(4), "s": np.array(["a", "b"])}, {"x": 2, "s": 2}, {"version": 2})
    assert dict(zarr.open_group(str(store), mode="r").attrs) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is published
        write_small_group(store, {"x": np.arange(4)}, {"x": 2}, {"bad": float("nan")})
    assert dict(zarr.open_group(str(store), mode="r").attrs) == {"version": 1}
    write_small_group(store, {"x": np.arange(6)}, {"x": 4}, {"version": 3})
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["x"][...], np.arange(6))
