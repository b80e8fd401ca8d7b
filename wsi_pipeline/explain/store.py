"""Per-slide tile concept-score stores: what stage 4 writes for each (encoder, concept set, slide).

`RESULTS/explain/{encoder}/{concept_set}/{slide_id}.zarr` is a Zarr v3 group with
  `cosine` (N x C float32): cosine similarity of each tile's stored feature with each concept's text embedding,
  `probs`  (N x C float32): softmax over the set's concepts at the text tower's `logit_scale` (sets of >= 2),
  `coords` (N x 2 int64): level-0 tile origins, in the feature (= tile) store's row order,
and attrs naming the concepts, the concept set and its prompt hash, and the provenance of both towers. Stores are
published atomically (io/atomic.py): a store at its final path is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FeatureError
from ..io.atomic import atomic_group
from ..io.jsonio import to_jsonable
from ..io.zarr_access import attrs_dict, read_array

if TYPE_CHECKING:
    import zarr

SCORE_ARRAYS = ("cosine", "probs")


@dataclass
class ConceptScores:
    """One slide's tile x concept scores, rows in the tile store's order."""

    concepts: list[str]
    cosine: np.ndarray  # (N, C) float32
    coords: np.ndarray  # (N, 2) int64
    probs: np.ndarray | None = None  # (N, C) float32, softmax over concepts at logit_scale
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, c = self.cosine.shape if self.cosine.ndim == 2 else (-1, -1)
        if c != len(self.concepts) or self.coords.shape != (n, 2):
            raise ValueError(
                f"concept scores of shape {self.cosine.shape} with coords {self.coords.shape} do not match "
                f"{len(self.concepts)} concepts"
            )
        if self.probs is not None and self.probs.shape != self.cosine.shape:
            raise ValueError(f"probs {self.probs.shape} and cosine {self.cosine.shape} differ in shape")

    @property
    def n_tiles(self) -> int:
        return int(self.cosine.shape[0])


def create_score_arrays(
    group: zarr.Group, n_rows: int, n_concepts: int, chunk_rows: int, probs: bool
) -> dict[str, zarr.Array]:
    """The empty arrays of a concept-score store in `group`: `cosine` (+ `probs`) and `coords`, `chunk_rows` rows
    per chunk. Scores are stored uncompressed: float32 cosines barely compress, and compressing them would cost
    about as much CPU as computing them."""
    rows = max(1, min(chunk_rows, n_rows))
    out = {
        name: group.create_array(
            name,
            shape=(n_rows, n_concepts),
            dtype="float32",
            chunks=(rows, max(n_concepts, 1)),
            fill_value=np.nan,
            compressors=None,
        )
        for name in SCORE_ARRAYS
        if name == "cosine" or probs
    }
    out["coords"] = group.create_array("coords", shape=(n_rows, 2), dtype="int64", chunks=(rows, 2), fill_value=0)
    return out


def finished_attrs(attrs: dict[str, Any], concepts: list[str], n_rows: int) -> dict[str, Any]:
    """A complete store's attributes: `attrs` plus the concepts, the row count and `complete: true`."""
    return to_jsonable({**attrs, "concepts": list(concepts), "n_tiles": n_rows, "complete": True})


def write_concept_scores(path: str | os.PathLike[str], scores: ConceptScores, chunk_rows: int = 4096) -> Path:
    """Publish `scores` as a complete store at `path` (atomic; an existing store there is replaced)."""
    path = Path(path)
    n, c = scores.cosine.shape
    with atomic_group(path) as g:
        arrays = create_score_arrays(g, n, c, chunk_rows, scores.probs is not None)
        if n:
            arrays["cosine"][:] = scores.cosine.astype(np.float32)
            if scores.probs is not None:
                arrays["probs"][:] = scores.probs.astype(np.float32)
            arrays["coords"][:] = scores.coords
        g.update_attributes(finished_attrs(scores.attrs, scores.concepts, n))
    return path


def read_concept_scores(path: str | os.PathLike[str]) -> ConceptScores:
    """A complete concept-score store; a missing or unfinished one is one FeatureError line naming it."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FeatureError(f"{path}: no concept-score store here; run `wsi-pipeline concepts` (or the workflow) first")
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = attrs_dict(g)
        if not attrs.get("complete"):
            raise FeatureError(f"{path}: concept-score store is incomplete; delete it and score the slide again")
        probs = read_array(g, "probs").astype(np.float32) if "probs" in g else None
        return ConceptScores(
            concepts=[str(c) for c in attrs.get("concepts", [])],
            cosine=read_array(g, "cosine").astype(np.float32),
            coords=read_array(g, "coords").astype(np.int64),
            probs=probs,
            attrs=attrs,
        )
    except FeatureError:
        raise
    except Exception as e:  # zarr raises many types for a damaged store
        raise FeatureError(
            f"{path}: cannot read the concept-score store ({type(e).__name__}: {e}); delete it and score again"
        ) from e


def is_complete_concept_store(path: Path, expect: dict[str, Any] | None = None) -> bool:
    """True when `path` is a finished concept-score store whose attrs match `expect` (e.g. prompt hash)."""
    import zarr

    if not (path / "zarr.json").is_file():
        return False
    try:
        attrs = attrs_dict(zarr.open_group(str(path), mode="r"))
    except Exception:  # unreadable metadata: not a usable store
        return False
    return bool(attrs.get("complete")) and all(attrs.get(k) == v for k, v in (expect or {}).items())
