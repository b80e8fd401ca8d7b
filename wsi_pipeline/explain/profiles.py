"""What the model looked at, in concepts: per slide, attention-weighted concept profiles; per task, which concepts
separate the classes or risk groups.

Per slide and concept set, with attention a (normalised to sum 1 over the slide's tiles) and tile scores S (N x C):
  weighted   = a @ S                    the concept profile where the model looks
  mean       = S.mean(0)                the slide's own profile, every tile alike
  enrichment = weighted - mean          > 0: the concept is over-represented under attention
Scores are the model's softmax over the set when the store has it (comparable across concepts, sums to 1 per
tile), else the cosine. Attention rows (feature-store order) and concept rows are matched by level-0 coords.

Per task the unit of the statistics is the patient (a slide's enrichment averaged over the patient's slides within
one group), so several slides of one patient never count as independent evidence. Per concept: Cliff's delta of
group A against group B (P(a > b) - P(a < b), from the Mann-Whitney U) with a seeded percentile-bootstrap CI, the
two-sided Mann-Whitney p and Benjamini-Hochberg q over every row of the task's table (one family per task).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from ..errors import FeatureError
from ..io.atomic import write_bytes_atomic
from ..io.zarr_access import attrs_dict, read_array
from .store import ConceptScores

TOP_CONCEPTS = 5  # concepts listed per slide and set (most enriched first)
TILE_CONCEPTS = 3  # concepts listed per top tile and set (highest score first)
HIGH, LOW = "high risk", "low risk"
TABLE_COLUMNS = [
    "concept_set",
    "score",
    "contrast",
    "group_a",
    "group_b",
    "concept",
    "n_a",
    "n_b",
    "mean_a",
    "mean_b",
    "mean_diff",
    "cliffs_delta",
    "ci_low",
    "ci_high",
    "p",
    "q",
    "significant",
]


@dataclass
class Attention:
    """One slide's attention as stage 3 wrote it (mil/train.write_attention)."""

    scores: np.ndarray  # (N,) float64
    coords: np.ndarray | None  # (N, 2) int64, feature-store order; None for stores without coords
    attrs: dict[str, Any] = field(default_factory=dict)


def read_attention(path: str | os.PathLike[str]) -> Attention:
    """A slide's attention store; a missing or damaged one is one FeatureError line naming it."""
    import zarr

    path = Path(path)
    try:
        g = zarr.open_group(str(path), mode="r")
        scores = read_array(g, "scores").astype(np.float64).ravel()
        coords = read_array(g, "coords").astype(np.int64).reshape(-1, 2) if "coords" in g else None
        return Attention(scores, coords, attrs_dict(g))
    except Exception as e:  # zarr raises many types for a damaged or missing store
        raise FeatureError(
            f"{path}: cannot read the attention store ({type(e).__name__}: {e}); retrain the task's fold "
            "(wsi-pipeline mil-train) to write it again"
        ) from e


def holds_logits(attrs: dict[str, Any]) -> bool:
    """Whether an attention store holds per-tile logits, not attention shares: a zero-shot task writes its tiles'
    predicted-class logits where trained tasks write attention and says so in `score` (explain/zero_shot_io.py)."""
    return "score" in attrs


def attention_weights(scores: np.ndarray, where: str | os.PathLike[str], logits: bool = False) -> np.ndarray:
    """Attention normalised to sum 1 over the slide (a pooled patient's bag spreads its attention over slides);
    `logits` (a zero-shot task's tile logits, at the model's own temperature): their softmax over the slide."""
    a = np.asarray(scores, dtype=np.float64).ravel()
    if logits and a.size and np.isfinite(a).all():
        return np.asarray(special.softmax(a), dtype=np.float64)
    total = a.sum() if a.size else 0.0
    if not np.isfinite(a).all() or (a < 0).any() or total <= 0:
        raise FeatureError(
            f"{where}: attention must be finite, non-negative and not all zero (got sum {total:.3g}); "
            "retrain the task's fold to write it again"
        )
    return a / total


def score_matrix(scores: ConceptScores) -> tuple[np.ndarray, str]:
    """The tile x concept values profiles are built from, and their kind ('probs' or 'cosine')."""
    if scores.probs is not None:
        return scores.probs.astype(np.float64), "probs"
    return scores.cosine.astype(np.float64), "cosine"


def coord_keys(coords: np.ndarray) -> np.ndarray:
    """One int64 per (x, y) level-0 origin (both < 2**31), for matching rows of two stores."""
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return (c[:, 0] << 32) | (c[:, 1] & 0xFFFFFFFF)


def align_rows(
    att_coords: np.ndarray | None,
    concept_coords: np.ndarray,
    att_path: str | os.PathLike[str],
    concept_path: str | os.PathLike[str],
) -> np.ndarray:
    """For each attention row, its row in the concept store (matched by coords); one FeatureError line when the two
    stores do not describe the same tiles (one of them written before the slide was tiled or encoded again)."""
    n_c = len(concept_coords)
    fix = (
        "the slide was tiled or encoded again after one of them was written: rerun `wsi-pipeline concepts` for it "
        "(and retrain the task if its features changed)"
    )
    if att_coords is None:  # an attention store without coords: only the row order can match them
        return np.arange(n_c)
    n_a = len(att_coords)
    keys_c = coord_keys(concept_coords)
    if len(np.unique(keys_c)) != n_c:
        raise FeatureError(f"{concept_path}: the concept store lists a tile origin twice; {fix}")
    order = np.argsort(keys_c, kind="stable")
    keys_a = coord_keys(att_coords)
    pos = np.clip(np.searchsorted(keys_c, keys_a, sorter=order), 0, max(n_c - 1, 0))
    found = (keys_c[order[pos]] == keys_a) if n_c else np.zeros(n_a, bool)
    if n_a != n_c or not found.all():
        raise FeatureError(
            f"{concept_path}: concept scores do not line up with the attention in {att_path} ({n_c} concept rows, "
            f"{n_a} attention rows, {int((~found).sum())} attention tiles without concept scores); {fix}"
        )
    return order[pos]


def concept_profile(weights: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weighted, mean, enrichment) profiles of one slide: weights (N,) summing to 1, scores (N, C)."""
    s = np.asarray(scores, dtype=np.float64)
    weighted = np.asarray(weights, dtype=np.float64) @ s
    mean = s.mean(axis=0)
    return weighted, mean, weighted - mean


@dataclass
class SetProfile:
    """One slide's profile over one concept set; `tile_scores` are aligned with the attention rows."""

    concept_set: str
    score_kind: str
    concepts: list[str]
    tile_scores: np.ndarray  # (N, C)
    weighted: np.ndarray  # (C,)
    mean: np.ndarray
    enrichment: np.ndarray

    def top_concepts(self, n: int = TOP_CONCEPTS) -> list[int]:
        """Indices of the n most enriched concepts, highest first (ties by set order)."""
        return [int(i) for i in np.argsort(-self.enrichment, kind="stable")[:n]]

    def to_json(self, n_top: int = TOP_CONCEPTS) -> dict[str, Any]:
        return {
            "score": self.score_kind,
            "concepts": self.concepts,
            "weighted": self.weighted,
            "mean": self.mean,
            "enrichment": self.enrichment,
            "top_concepts": [
                {
                    "concept": self.concepts[i],
                    "enrichment": self.enrichment[i],
                    "weighted": self.weighted[i],
                    "mean": self.mean[i],
                }
                for i in self.top_concepts(n_top)
            ],
        }


def profile_set(
    concept_set: str, weights: np.ndarray, att: Attention, att_path: Path, scores: ConceptScores, concept_path: Path
) -> SetProfile:
    """A slide's profile over one concept set, its rows matched to the attention's."""
    rows = align_rows(att.coords, scores.coords, att_path, concept_path)
    if len(rows) != len(weights):
        raise FeatureError(
            f"{concept_path}: {len(rows)} concept rows but {len(weights)} attention rows in {att_path} (and no coords "
            "to match them by); rerun `wsi-pipeline concepts` for the slide and retrain the task"
        )
    values, kind = score_matrix(scores)
    tile_scores = values[rows]
    weighted, mean, enrichment = concept_profile(weights, tile_scores)
    return SetProfile(concept_set, kind, list(scores.concepts), tile_scores, weighted, mean, enrichment)


def top_tiles(
    weights: np.ndarray,
    coords: np.ndarray,
    profiles: dict[str, SetProfile],
    k: int,
    captions: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The k highest-attention tiles: origin, attention share, each set's top concepts, and a caption if given
    (captions are in the same order: the slide's top-attention tiles, highest first)."""
    order = np.argsort(-weights, kind="stable")[:k]
    tiles = []
    for rank, i in enumerate(order):
        entry: dict[str, Any] = {"rank": rank + 1, "x": int(coords[i, 0]), "y": int(coords[i, 1])}
        entry["attention"] = float(weights[i])
        entry["concepts"] = {
            name: [
                {"concept": p.concepts[j], "score": float(p.tile_scores[i, j])}
                for j in np.argsort(-p.tile_scores[i], kind="stable")[:TILE_CONCEPTS]
            ]
            for name, p in profiles.items()
        }
        if captions is not None and rank < len(captions):
            entry["caption"] = str(captions[rank])
        tiles.append(entry)
    return tiles


# --- cohort statistics ------------------------------------------------------------------------------------------


def cliffs_delta(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(a > b) - P(a < b) along `axis` (ties count zero) = 2 U_a / (n_a n_b) - 1, U from ranks (any batch shape)."""
    a, b = np.moveaxis(np.asarray(a, float), axis, -1), np.moveaxis(np.asarray(b, float), axis, -1)
    na, nb = a.shape[-1], b.shape[-1]
    ranks = stats.rankdata(np.concatenate([a, b], axis=-1), axis=-1)
    u = ranks[..., :na].sum(axis=-1) - na * (na + 1) / 2.0
    return np.asarray(2.0 * u / (na * nb) - 1.0)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p (scipy) over the finite entries; NaN p (an undefined test) stays NaN."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def compare_groups(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per column (concept) of a (n_a, C) against b (n_b, C): means, Cliff's delta with a percentile-bootstrap CI
    (groups resampled separately, `n_boot` times, seeded) and the two-sided Mann-Whitney p."""
    c = a.shape[1]
    nan = np.full(c, np.nan)
    out = {"mean_a": a.mean(0) if len(a) else nan, "mean_b": b.mean(0) if len(b) else nan}
    out["mean_diff"] = out["mean_a"] - out["mean_b"]
    if len(a) < 2 or len(b) < 2:  # no test, no interval from a group of one
        return out | {"cliffs_delta": nan, "ci_low": nan, "ci_high": nan, "p": nan}
    out["cliffs_delta"] = cliffs_delta(a, b, axis=0)
    out["p"] = np.asarray(stats.mannwhitneyu(a, b, alternative="two-sided", axis=0).pvalue, dtype=float)
    lo, hi = nan, nan
    if n_boot > 0:
        with warnings.catch_warnings():  # a constant concept gives a degenerate (still correct) interval
            warnings.simplefilter("ignore")
            ci = stats.bootstrap(
                (a, b),
                cliffs_delta,
                n_resamples=n_boot,
                axis=0,
                vectorized=True,
                method="percentile",
                rng=np.random.default_rng(seed),
                batch=max(1, 2_000_000 // max(1, (len(a) + len(b)) * c)),  # bounded memory on big cohorts
            ).confidence_interval
        lo, hi = np.asarray(ci.low, float), np.asarray(ci.high, float)
    return out | {"ci_low": lo, "ci_high": hi}


def contrasts(task_type: str, classes: Sequence[str]) -> list[tuple[str, list[str], list[str]]]:
    """(name, groups of A, groups of B): two classes: the second against the first; more: each class against the
    rest; survival: predicted high against low risk (median split of each fold's predictions)."""
    if task_type == "survival":
        return [(f"{HIGH} vs {LOW}", [HIGH], [LOW])]
    names = [str(c) for c in classes]
    if len(names) == 2:
        return [(f"{names[1]} vs {names[0]}", [names[1]], [names[0]])]
    return [(f"{c} vs rest", [c], [o for o in names if o != c]) for c in names]


def concept_table(
    slides: Sequence[dict[str, Any]],
    profiles: dict[str, dict[str, SetProfile]],
    task_type: str,
    classes: Sequence[str],
    n_boot: int,
    fdr: float,
) -> pd.DataFrame:
    """One row per concept set x contrast x concept (TABLE_COLUMNS). `slides` are records with slide_id,
    patient_id and group; `profiles[slide_id][set]` their profiles. Enrichment is averaged per patient and group."""
    rows: list[dict[str, Any]] = []
    sets = list(dict.fromkeys(name for sid in profiles for name in profiles[sid]))
    for name in sets:
        have = [s for s in slides if name in profiles.get(s["slide_id"], {})]
        if not have:
            continue
        first = profiles[have[0]["slide_id"]][name]
        enrich = pd.DataFrame(
            [profiles[s["slide_id"]][name].enrichment for s in have], columns=pd.Index(range(len(first.concepts)))
        )
        enrich["patient"] = [s["patient_id"] for s in have]
        enrich["group"] = [s["group"] for s in have]
        units = enrich.groupby(["patient", "group"], sort=True).mean()
        groups = units.index.get_level_values("group").astype(str)
        values = units.to_numpy(float)
        for contrast, in_a, in_b in contrasts(task_type, classes):
            a, b = values[groups.isin(in_a)], values[groups.isin(in_b)]
            res = compare_groups(a, b, n_boot)
            for j, concept in enumerate(first.concepts):
                rows.append(
                    {
                        "concept_set": name,
                        "score": first.score_kind,
                        "contrast": contrast,
                        "group_a": ";".join(in_a),
                        "group_b": ";".join(in_b),
                        "concept": concept,
                        "n_a": len(a),
                        "n_b": len(b),
                        **{k: float(np.asarray(v)[j]) for k, v in res.items()},
                    }
                )
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c not in ("q", "significant")])
    table["q"] = bh_qvalues(table["p"].to_numpy(float)) if len(table) else []
    table["significant"] = table["q"].to_numpy(float) <= fdr  # NaN q (no test) is never significant
    return table[TABLE_COLUMNS]


def write_csv_atomic(path: str | os.PathLike[str], table: pd.DataFrame) -> None:
    """A CSV written to a temporary beside `path` and renamed over it: a reader never sees half a table."""
    write_bytes_atomic(path, table.to_csv(index=False, float_format="%.6g").encode("utf-8"))
