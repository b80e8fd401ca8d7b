"""MI-Zero zero-shot slide classification (Lu et al., CVPR 2023) from the stored tile features: nothing is trained.

Per bag (a patient's slides pooled, or one slide, as in trained tasks) and class: every tile's similarity with the
class's prompt-ensemble text embedding (`logit_scale * cosine`), pooled by the mean of the class's K most similar
tiles (each K of `task.top_k`, clipped to the bag's size: `top{K}`) and by the mean over all tiles (`mean`); the
bag's class probabilities are the softmax over its pooled class scores.

    emb = zero_shot_embeddings(task, build_text_encoder(cfg.encoder), layout.text_cache_dir(cfg.encoder.name))
    summary = run_zero_shot_task(results, task, cfg.mil.train, cfg.encoder.name, emb)

The task folder is written as a trained task's (mil/train.py) so zero-shot and ABMIL land in one table: the same
patient-level splits (`task_splits`), per fold the test bags' predictions.csv + metrics.json at `primary_k`
(nothing is fitted, but fold-wise numbers compare with the trained tasks' fold means), summary.json from
`evaluate_task` plus a `zero_shot` section (every pooling, the prompts, text provenance), written by
`zero_shot_io.py`. K is fixed by the config, never chosen on the test data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from ..errors import ConfigError, FeatureError, TrainingDataError
from ..io.zarr_access import attrs_dict, read_array, zarr_array
from ..layout import ResultsLayout
from ..mil.bags import Bag, ZarrStore, bags_from_sheet, load_sheet, prefetch
from ..mil.config import TaskConfig, TrainConfig, as_task, as_train
from ..mil.splits import task_splits
from .concepts import prompt_set_hash
from .config import ConceptSet
from .similarity import check_same_model, softmax_at_scale, tile_cosine
from .text_cache import ConceptEmbeddings, class_prompt_set, concept_embeddings
from .zero_shot_io import (
    BagScores,
    ZeroShotRun,
    first_seed_tests,
    summarize_zero_shot,
    write_tile_logits,
    write_zero_shot,
)

if TYPE_CHECKING:
    from ..encoders.text import TextEncoder

READ_ROWS = 8192  # feature rows read (and widened to float32) at a time: ~25 MB at 768 wide


def pooling_names(top_k: Sequence[int]) -> list[str]:
    """`top{K}` for each K (ascending), then `mean`: the poolings every zero-shot output lists, in this order."""
    return [f"top{k}" for k in sorted(set(top_k))] + ["mean"]


def pool_tile_scores(scores: np.ndarray, top_k: Sequence[int]) -> dict[str, np.ndarray]:
    """(tiles, classes) scores -> per pooling a (classes,) slide score: for `top{K}` the mean of each class's own K
    highest tiles (K clipped to the bag: a 3-tile bag's top10 is its mean), for `mean` the mean over all tiles."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"tile scores must be a non-empty (tiles, classes) array, not shape {s.shape}")
    n = s.shape[0]
    best_first = np.cumsum(-np.sort(-s, axis=0), axis=0)  # row k-1: each class's sum over its k best tiles
    pooled = {f"top{k}": best_first[min(k, n) - 1] / min(k, n) for k in sorted(set(top_k))}
    pooled["mean"] = best_first[-1] / n
    return pooled


def class_probabilities(pooled_cosine: np.ndarray, logit_scale: float, logit_bias: float | None = None) -> np.ndarray:
    """Softmax over classes of `logit_scale * pooled cosine (+ bias)`, for one (C,) or many (B, C) bags. Pooling
    cosines then scaling equals pooling the logits: the scale is positive and the bias the same for every class."""
    x = np.asarray(pooled_cosine, dtype=np.float64)
    return softmax_at_scale(np.atleast_2d(x), logit_scale, logit_bias).reshape(x.shape)


def task_prompt_set(task: TaskConfig) -> ConceptSet:
    """The task's class prompts as a concept set (one concept per class, in class_prompts order)."""
    try:
        return class_prompt_set(f"zero-shot-{task.name}", dict(task.class_prompts or {}), task.templates)
    except ValidationError as err:  # e.g. a phrasing listed twice, or two classes differing only in case
        first = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"task {task.name!r}: class_prompts: {first}") from None


def zero_shot_embeddings(
    task: TaskConfig, text_encoder: TextEncoder, cache_dir: str | Path | None = None
) -> ConceptEmbeddings:
    """The task's class embeddings (prompt ensembles over its templates), cached in `cache_dir` like concept sets."""
    return concept_embeddings(text_encoder, task_prompt_set(task), cache_dir)


def check_embeddings(task: TaskConfig, embeddings: ConceptEmbeddings) -> None:
    """The embeddings must be of exactly this task's classes, prompts and templates, in its class order."""
    expected = task_prompt_set(task)
    if embeddings.concepts != expected.concept_names or embeddings.prompt_hash != prompt_set_hash(expected):
        raise ConfigError(
            f"task {task.name!r}: the text embeddings given are of {embeddings.concept_set!r} "
            f"({embeddings.concepts}), not of the task's class_prompts and templates; embed them with "
            "zero_shot_embeddings(task, text_encoder)"
        )


class TileSimilarity:
    """A `BagStore` over stage-2 feature stores giving each bag's (tiles, classes) cosine with the class embeddings,
    read in row blocks (the bag's features never sit in memory at once)."""

    def __init__(self, features_dir: str | Path, embeddings: ConceptEmbeddings) -> None:
        self.features = ZarrStore(features_dir)
        self.embeddings = embeddings
        self.dim = len(embeddings.concepts)

    def _open(self, slide_id: str) -> Any:  # a zarr.Group
        try:
            return self.features.open(slide_id)
        except Exception as err:  # zarr raises many types for a damaged store
            raise self._unreadable(slide_id, err) from err

    def _unreadable(self, slide_id: str, err: Exception) -> FeatureError:
        return FeatureError(
            f"{self.features.path(slide_id)}: cannot read the feature store ({type(err).__name__}: {err}); "
            "re-encode the slide (wsi-pipeline encode --force)"
        )

    def check(self, bags: Sequence[Bag]) -> None:
        """Metadata only, before anything is written: every store written by the text tower's model (one line
        naming the first that is not), present, non-empty, as wide as the text embeddings; sets `bag.lengths`."""
        prov = self.embeddings.text_provenance
        for sid in dict.fromkeys(s for b in bags for s in b.slide_ids):
            if self.features.path(sid).exists():  # missing stores: all listed at once by ZarrStore.check below
                check_same_model(attrs_dict(self._open(sid)), prov, self.features.path(sid))
        self.features.check(list(bags))
        if self.features.dim != self.embeddings.dim:
            raise FeatureError(
                f"{self.features.root}: features are {self.features.dim}-dimensional but the text embeddings of "
                f"{prov.get('encoder')!r} are {self.embeddings.dim}-dimensional; encode the slides with the model "
                "whose text tower scores them"
            )

    def load(self, bag: Bag) -> np.ndarray:
        parts = []
        for sid in bag.slide_ids:
            try:
                arr = zarr_array(self._open(sid), "features")
                for start in range(0, arr.shape[0], READ_ROWS):
                    rows = np.asarray(arr[start : start + READ_ROWS])
                    parts.append(tile_cosine(rows, self.embeddings.embeddings))
            except FeatureError as err:  # non-finite or all-zero rows: name the store
                raise FeatureError(f"{self.features.path(sid)}: {err}") from None
            except Exception as err:  # a damaged chunk: the store, not a codec's internals
                raise self._unreadable(sid, err) from err
        return np.concatenate(parts)

    def coords(self, slide_id: str) -> np.ndarray:
        return read_array(self._open(slide_id), "coords").astype(np.int64)


def score_bag(
    bag: Bag, cosine: np.ndarray, task: TaskConfig, embeddings: ConceptEmbeddings, similarity: TileSimilarity
) -> tuple[BagScores, np.ndarray]:
    """Pool a bag's tile cosines, softmax each pooling, and list the primary K tiles of the predicted class; also
    every tile's logit for the predicted class (bag row order), for the per-slide maps."""
    pooled = pool_tile_scores(cosine, task.top_k)
    probs = {name: class_probabilities(v, embeddings.logit_scale, embeddings.logit_bias) for name, v in pooled.items()}
    predicted = int(np.argmax(probs[f"top{task.primary_k}"]))
    logits = cosine[:, predicted].astype(np.float64) * embeddings.logit_scale + (embeddings.logit_bias or 0.0)
    best = np.argsort(-cosine[:, predicted], kind="stable")[: min(task.primary_k, len(cosine))]
    starts = np.cumsum([0, *bag.lengths])
    tiles: list[dict[str, Any]] = []
    coords: dict[str, np.ndarray] = {}
    for i in best.tolist():
        which = int(np.searchsorted(starts, i, side="right")) - 1  # the slide holding bag row i
        sid, row = bag.slide_ids[which], i - int(starts[which])
        if sid not in coords:
            coords[sid] = similarity.coords(sid)
        x, y = (int(v) for v in coords[sid][row])
        tiles.append(
            {"slide_id": sid, "row": row, "x": x, "y": y, "cosine": float(cosine[i, predicted]), "logit": logits[i]}
        )
    return BagScores(bag, probs, predicted, tiles), logits.astype(np.float32)


def task_bags(sheet_csv: Path, task: TaskConfig) -> tuple[list[Bag], list[str]]:
    """The task's bags from its sheet (written by mil.workflow.write_task_sheet) and its class names."""
    if not sheet_csv.is_file():
        raise ConfigError(f"{sheet_csv}: no task sheet; write it first (wsi-pipeline mil-sheet --task {task.name})")
    if pd.read_csv(sheet_csv).empty:
        raise TrainingDataError(
            f"{sheet_csv}: no slide of zero-shot task {task.name!r} has features (excluded.csv beside it says why "
            "for each slide); encode the slides first (wsi-pipeline encode) or fix the sample sheet"
        )
    df, classes = load_sheet(sheet_csv, task)
    bags = bags_from_sheet(df, task)
    if not bags or classes is None:
        raise TrainingDataError(
            f"{sheet_csv}: no slide has a value in column {task.label!r} for zero-shot task {task.name!r}; "
            "fill in the labels in the sample sheet"
        )
    return bags, classes


def run_zero_shot_task(
    results: str | Path,
    task: TaskConfig | dict[str, Any],
    train: TrainConfig | dict[str, Any] | None,
    encoder_name: str,
    embeddings: ConceptEmbeddings,
    *,
    out_dir: str | Path | None = None,
    sheet_csv: str | Path | None = None,
    features_dir: str | Path | None = None,
    attention_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score a zero-shot task on every bag and write its folder as a trained task's; returns summary.json.

    Defaults: out_dir RESULTS/mil/TASK, sheet out_dir/sheet.csv, features RESULTS/features/ENCODER, per-tile
    predicted-class logits to RESULTS/attention/TASK (what the heatmaps and the explain page read). `train` gives
    the splits (folds, seeds, val_fraction), the bootstrap and the reader threads; nothing else of it is used.
    """
    task, cfg = as_task(task), as_train(train)
    if task.type != "zero-shot":
        raise ConfigError(f"task {task.name!r} is a {task.type} task, not zero-shot; train it (wsi-pipeline mil-train)")
    layout = ResultsLayout(results)
    out = Path(out_dir) if out_dir else layout.task_dir(task.name)
    sheet = Path(sheet_csv) if sheet_csv else out / "sheet.csv"
    feats = Path(features_dir) if features_dir else layout.feature_dir(encoder_name)
    check_embeddings(task, embeddings)
    bags, classes = task_bags(sheet, task)
    similarity = TileSimilarity(feats, embeddings)
    similarity.check(bags)  # every store, before any output
    splits = task_splits(out / "splits.json", bags, task, cfg)
    run = ZeroShotRun(
        out=out,
        task=task,
        train=cfg,
        classes=classes,
        poolings={name: (int(name[3:]) if name.startswith("top") else None) for name in pooling_names(task.top_k)},
        sheet=sheet,
        features_dir=feats,
        encoder=encoder_name,
        embeddings=embeddings,
    )
    att_dir = Path(attention_dir) if attention_dir else layout.attention_dir(task.name)
    tested_in = first_seed_tests(splits)
    scored = []
    for bag, cosine in zip(bags, prefetch(similarity, bags, cfg.loader_threads), strict=True):
        scores, logits = score_bag(bag, cosine, task, embeddings, similarity)
        write_tile_logits(run, scores, logits, tested_in[bag.bag_id], similarity.features, att_dir)
        scored.append(scores)
    write_zero_shot(run, splits, scored)
    return summarize_zero_shot(out)
