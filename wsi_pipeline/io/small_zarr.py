"""A Zarr v3 group of a few small arrays, written with the standard library (json + gzip): the stage-1 tile table.

Importing zarr costs a tile job ~0.2 s of CPU (about a quarter of the whole job on a 40x slide), and the table it
would write holds two arrays of a few MB at most. This writer covers exactly that case - a group with attributes,
C-order arrays chunked along the first axis, the `bytes` + `gzip` codecs, published atomically like every other
store (io/atomic.py) - and nothing more. Everything reads these stores with zarr; tests write the same table with
this module and with zarr and compare what zarr reads back.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import publish, temporary_name

# numpy dtype -> Zarr v3 data_type (the fixed-size numeric types the tile table uses, and their neighbours)
DATA_TYPES = {
    np.dtype(t): name
    for t, name in [
        (np.bool_, "bool"),
        (np.int8, "int8"),
        (np.int16, "int16"),
        (np.int32, "int32"),
        (np.int64, "int64"),
        (np.uint8, "uint8"),
        (np.uint16, "uint16"),
        (np.uint32, "uint32"),
        (np.uint64, "uint64"),
        (np.float32, "float32"),
        (np.float64, "float64"),
    ]
}
GZIP_LEVEL = 1  # the table is small: fast beats a few kB


def write_small_group(
    final_path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    chunk_rows: Mapping[str, int],
    attributes: Mapping[str, Any],
    overwrite: bool = True,
) -> None:
    """Write a Zarr v3 group at `final_path` holding `arrays` (chunks of `chunk_rows[name]` rows) and JSON-ready
    `attributes`; built under a temporary name and renamed into place, removed again on any error."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final_path)
    try:
        tmp.mkdir()
        _write_json(tmp / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)})
        for name, values in arrays.items():
            _write_array(tmp / name, np.asarray(values), int(chunk_rows[name]))
        publish(tmp, final_path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_group_attributes(store: str | os.PathLike[str]) -> dict[str, Any]:
    """A Zarr v3 group's attributes read straight from its zarr.json (no zarr import: the workflow reads these at
    parse time); {} when the store is absent or its metadata unreadable."""
    try:
        doc = json.loads((Path(store) / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    return attributes if isinstance(attributes, dict) else {}


def _write_array(folder: Path, values: np.ndarray, rows: int) -> None:
    if values.dtype not in DATA_TYPES or values.ndim < 1:
        raise TypeError(f"{folder.name}: {values.dtype} array of {values.ndim} dims is not written by small_zarr")
    rows = max(1, rows)
    chunk_shape = [rows, *values.shape[1:]]
    fill = values.dtype.type(0).item()  # False, 0 or 0.0: zarr's own default fill for the type
    folder.mkdir()
    _write_json(
        folder / "zarr.json",
        {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(values.shape),
            "data_type": DATA_TYPES[values.dtype],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": fill,
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "gzip", "configuration": {"level": GZIP_LEVEL}},
            ],
            "attributes": {},
            "storage_transformers": [],
        },
    )
    little = values.astype(values.dtype.newbyteorder("<"), copy=False)
    trailing = ["0"] * (values.ndim - 1)  # the other axes are one chunk each
    for index, start in enumerate(range(0, values.shape[0], rows)):
        chunk = little[start : start + rows]
        if len(chunk) < rows:  # a regular grid stores its last chunk full size; the rows past the end are fill
            padded = np.zeros(chunk_shape, dtype=little.dtype)
            padded[: len(chunk)] = chunk
            chunk = padded
        key = folder.joinpath("c", str(index), *trailing)
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(gzip.compress(np.ascontiguousarray(chunk).tobytes(), compresslevel=GZIP_LEVEL, mtime=0))


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=False))
