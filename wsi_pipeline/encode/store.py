"""Per-slide feature stores: chunk/shard layout, a streaming shard writer and the completeness check.

`RESULTS/features/{encoder}/{slide_id}.zarr` is a Zarr v3 group with `features` (N x D, float16 by default) and
`coords` (N x 2 int64, level 0, in tile-table order). Both arrays are sharded: chunks of many rows packed into a
few shard files per slide. The writer buffers exactly one shard of rows and writes each shard once when it fills,
so host memory does not grow with the slide and no shard file is rewritten (a partial-shard write in Zarr is a
read-modify-write of the whole shard).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import FeatureError
from ..io.zarr_access import zarr_array

FEATURE_DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: fast row-block reads, never one-row chunks
SHARD_BYTES = 32 << 20  # ~32 MiB shards: a 100k-tile ConceptCLIP slide is ~7 files, and the writer's buffer
MIN_CHUNK_ROWS = 16


@dataclass(frozen=True)
class StoreLayout:
    """Rows per chunk and per shard (a multiple of the chunk) of a feature store."""

    chunk_rows: int
    shard_rows: int

    def __post_init__(self) -> None:
        if self.chunk_rows < 1 or self.shard_rows < self.chunk_rows or self.shard_rows % self.chunk_rows:
            raise ValueError(
                f"shard_rows={self.shard_rows} must be a positive multiple of chunk_rows={self.chunk_rows}"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def plan_layout(
    n_rows: int, embed_dim: int, dtype: str = "float16", chunk_bytes: int = CHUNK_BYTES, shard_bytes: int = SHARD_BYTES
) -> StoreLayout:
    """A layout depending only on (rows, width, dtype), so every writer of a slide lays it out identically."""
    row_bytes = max(1, embed_dim) * np.dtype(dtype).itemsize
    chunk = max(MIN_CHUNK_ROWS, _pow2_floor(chunk_bytes // row_bytes))
    per_shard = max(1, _pow2_floor(shard_bytes // (chunk * row_bytes)))
    # Small slides: one chunk (rounded up to a multiple of 16 rows) and one shard.
    chunk = min(chunk, max(MIN_CHUNK_ROWS, -(-n_rows // MIN_CHUNK_ROWS) * MIN_CHUNK_ROWS))
    shard = min(chunk * per_shard, max(chunk, -(-n_rows // chunk) * chunk))
    return StoreLayout(chunk, shard)


def create_feature_arrays(
    group: zarr.Group, n_rows: int, embed_dim: int, dtype: str, layout: StoreLayout
) -> tuple[zarr.Array, zarr.Array]:
    """`features` (n_rows x embed_dim) and `coords` (n_rows x 2) in `group`, sharded by `layout`."""
    if dtype not in FEATURE_DTYPES:
        raise FeatureError(f"feature dtype {dtype!r} is not supported; use one of {', '.join(FEATURE_DTYPES)}")
    c, s = layout.chunk_rows, layout.shard_rows
    # NaN fill: rows never written (a killed writer, a shard file lost in a copy) read as NaN, which every reader
    # rejects as non-finite, rather than as plausible zero features
    feats = group.create_array(
        "features",
        shape=(n_rows, embed_dim),
        dtype=dtype,
        chunks=(c, embed_dim),
        shards=(s, embed_dim),
        fill_value=float("nan"),
    )
    coords = group.create_array("coords", shape=(n_rows, 2), dtype="int64", chunks=(c, 2), shards=(s, 2), fill_value=0)
    return feats, coords


class ShardWriter:
    """Stream rows, in order, into `array[start:stop]`, one whole shard per write.

    `start` must sit on a shard boundary; at most `shard_rows` rows are ever held (see `peak_rows`)."""

    def __init__(self, array: zarr.Array, start: int = 0, stop: int | None = None) -> None:
        self.array = array
        self.shard_rows = int((array.shards or array.chunks)[0])
        self.start = int(start)
        self.stop = int(array.shape[0] if stop is None else stop)
        if self.start % self.shard_rows:
            raise ValueError(f"writer start {start} is not on a shard boundary ({self.shard_rows} rows)")
        self._buf = np.empty(
            (min(self.shard_rows, max(self.stop - self.start, 0)), *array.shape[1:]), dtype=array.dtype
        )
        self._fill = 0
        self.written = 0  # rows already in the array
        self.peak_rows = 0
        self.flushes = 0

    @property
    def position(self) -> int:
        return self.start + self.written + self._fill

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if self.position + len(rows) > self.stop:
            raise ValueError(f"{len(rows)} rows overflow the writer's range [{self.start}, {self.stop})")
        i = 0
        while i < len(rows):
            take = min(len(rows) - i, len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + take] = rows[i : i + take]  # casts to the store dtype
            self._fill += take
            i += take
            self.peak_rows = max(self.peak_rows, self._fill)
            if self._fill == len(self._buf) or self.position == self.stop:
                self._flush()

    def _flush(self) -> None:
        if not self._fill:
            return
        at = self.start + self.written
        self.array[at : at + self._fill] = self._buf[: self._fill]
        self.written += self._fill
        self._fill = 0
        self.flushes += 1

    def close(self) -> None:
        self._flush()
        if self.start + self.written != self.stop:
            raise FeatureError(f"{self.array.store}: wrote {self.written} of {self.stop - self.start} rows")


def is_complete_store(path: Path, expect: Mapping[str, Any] | None = None) -> bool:
    """True when `path` is a finished feature store whose attrs match `expect` (encoder config, dtype, tiles)."""
    if not (path / "zarr.json").is_file():
        return False
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
        n = zarr_array(g, "features").shape[0]
        ok = bool(attrs.get("complete")) and n == zarr_array(g, "coords").shape[0] == attrs.get("n_tiles")
    except Exception:  # unreadable metadata: not a usable store
        return False
    return ok and all(attrs.get(k) == v for k, v in (expect or {}).items())
