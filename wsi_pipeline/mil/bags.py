"""Bags of instance features: per-slide Zarr stores (read lazily, optional byte-bounded cache) or an instance CSV.

A `Bag` is one training sample: a patient (its slides pooled) or a slide, with its target. A `BagStore` turns a
bag into a float32 (N, D) array on demand, so a cohort never has to fit in memory.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from ..errors import TrainingDataError
from .config import TaskConfig
from .labels import refuse_label_typos, refuse_no_events, refuse_one_class


@dataclass
class Bag:
    bag_id: str
    slide_ids: list[str]
    label: int | None = None
    time: float | None = None
    event: int | None = None
    lengths: list[int] = field(default_factory=list)  # instances per slide, filled by the store
    patient_id: str = ""  # the split group; defaults to bag_id

    def __post_init__(self) -> None:
        self.patient_id = self.patient_id or self.bag_id


class BagStore(Protocol):
    dim: int

    def load(self, bag: Bag) -> np.ndarray: ...


class ArrayStore:
    """Bags already in memory (e.g. the classic MIL CSVs)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.dim = next(iter(arrays.values())).shape[1] if arrays else 0

    def load(self, bag: Bag) -> np.ndarray:
        return self.arrays[bag.bag_id]


class ZarrStore:
    """Per-slide Zarr feature stores `features_dir/{slide_id}.zarr`, read in chunks when a bag is needed.

    `array` is the per-tile matrix a bag is made of: `features` in stage-2 stores, `cosine` in stage-4 concept-score
    stores (a concept-bottleneck task). Recently used bags are kept (as stored) while they fit in `cache_bytes`.
    """

    def __init__(self, features_dir: str | Path, cache_bytes: int = 0, array: str = "features") -> None:
        self.root = Path(features_dir)
        self.array = array
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()  # `prefetch` reads bags from several threads
        self.dim = 0

    def path(self, slide_id: str) -> Path:
        return self.root / f"{slide_id}.zarr"

    def open(self, slide_id: str):  # noqa: ANN201 - a zarr.Group
        import zarr

        return zarr.open_group(str(self.path(slide_id)), mode="r")

    def _unreadable(self, slide_id: str, exc: Exception) -> TrainingDataError:
        return TrainingDataError(
            f"{self.path(slide_id)}: cannot read array {self.array!r} ({type(exc).__name__}: "
            f"{exc}); re-run feature extraction (or concept scoring) for this slide"
        )

    def check(self, bags: list[Bag]) -> None:
        """Metadata-only checks before any training: every store exists, has features, one width for all."""
        missing = [s for b in bags for s in b.slide_ids if not self.path(s).exists()]
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise TrainingDataError(
                f"{len(missing)} slide(s) in the label table have no feature store under {self.root}: {shown}; "
                "run feature extraction for them or remove them from the sample sheet"
            )
        dims: dict[int, str] = {}
        for bag in bags:
            bag.lengths = []
            for sid in bag.slide_ids:
                try:
                    arr = self.open(sid)[self.array]
                except Exception as exc:
                    raise self._unreadable(sid, exc) from exc
                if arr.ndim != 2 or arr.shape[0] == 0:
                    raise TrainingDataError(
                        f"{self.path(sid)}: empty bag ({self.array} shape {arr.shape}); "
                        "check its tissue mask/tile grid or drop the slide from the sheet"
                    )
                dims.setdefault(int(arr.shape[1]), str(self.path(sid)))
                bag.lengths.append(int(arr.shape[0]))
        if len(dims) > 1:
            raise TrainingDataError(
                f"feature stores differ in width {sorted(dims)} (e.g. {list(dims.values())}); "
                "use features from a single encoder"
            )
        self.dim = next(iter(dims)) if dims else 0

    def load(self, bag: Bag) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(bag.bag_id)
            if hit is not None:
                self._cache.move_to_end(bag.bag_id)
        if hit is not None:
            return hit.astype(np.float32)
        parts = []
        for sid in bag.slide_ids:
            try:
                feats = np.asarray(self.open(sid)[self.array][...])  # whole array, read chunk by chunk by zarr
            except Exception as exc:  # a damaged chunk: name the store, not a codec's internals
                raise self._unreadable(sid, exc) from exc
            if feats.shape[0] == 0:
                raise TrainingDataError(f"{self.path(sid)}: empty bag; drop the slide from the sheet")
            if not all_finite(feats):
                raise TrainingDataError(
                    f"{self.path(sid)}: features contain NaN or infinity (or rows never "
                    "written); re-run feature extraction for this slide"
                )
            parts.append(feats)
        feats = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self.cache_bytes and feats.nbytes <= self.cache_bytes:
            with self._lock:
                if bag.bag_id not in self._cache:
                    self._cache[bag.bag_id] = feats
                    self._cached += feats.nbytes
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return feats.astype(np.float32)

    def coords(self, slide_id: str) -> np.ndarray:
        return np.asarray(self.open(slide_id)["coords"][...])


def all_finite(x: np.ndarray) -> bool:
    """No NaN or infinity; float16 is checked on its exponent bits (np.isfinite on float16 is slow)."""
    if x.dtype == np.float16:
        return not bool(((x.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(x).all())


def prefetch(store: BagStore, bags: Sequence[Bag], threads: int, ahead: int = 8) -> Generator[np.ndarray, None, None]:
    """`store.load(bag)` for each bag, in order, read by `threads` background threads up to `ahead` bags early.

    Reading and decompressing the next bags overlaps the model's step on the current one, so a fast device is
    not left waiting on the disk. Results and their order are those of a plain loop (threads=0 is that loop).
    """
    if threads <= 0 or len(bags) <= 1 or isinstance(store, ArrayStore):  # nothing to read ahead
        yield from (store.load(b) for b in bags)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bag-reader")
    pending: deque[Future[np.ndarray]] = deque()
    try:
        for i, bag in enumerate(bags):
            pending.append(pool.submit(store.load, bag))
            if i + 1 >= ahead or i + 1 == len(bags):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # stop reading ahead when the consumer stops early or fails
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def load_sheet(sheet_csv: str | Path, task: TaskConfig) -> tuple[pd.DataFrame, list[str] | None]:
    """Read and validate the sample sheet for one task; rows without a target for this task are dropped.

    Returns the table with a `_target`/`_time`/`_event` column and the class names (classification).
    """
    path = Path(sheet_csv)
    try:
        df = pd.read_csv(path, dtype={task.slide_col: str})
    except Exception as exc:
        raise TrainingDataError(f"{path}: cannot read the sample sheet ({exc}); give a CSV with a header") from exc
    need = [task.slide_col] + [c for c in (task.label, task.time, task.event, task.patient_col) if c]
    absent = [c for c in need if c not in df.columns]
    if absent:
        raise TrainingDataError(
            f"{path}: column(s) {absent} missing for task {task.name!r}; the sheet has {list(df.columns)}"
        )
    if task.patient_col is None:
        df["_patient"] = df[task.slide_col].astype(str)
    else:
        df["_patient"] = df[task.patient_col].fillna(df[task.slide_col]).astype(str)
    df[task.slide_col] = df[task.slide_col].astype(str)
    # bags, splits and models must not depend on the order of the sheet's rows: patients, then slides, by id
    df = df.sort_values(["_patient", task.slide_col], kind="stable").reset_index(drop=True)
    if task.type != "survival":  # classification, and zero-shot (scored against the label, nothing trained)
        df = df[df[task.label].notna()].copy()
        values = label_strings(df[task.label])
        classes = _task_classes(path, task, values, df[task.slide_col])
        df["_target"] = values.map({c: i for i, c in enumerate(classes)}).astype(int)
        refuse_one_class(values.tolist(), task.name, str(path), str(task.label))
        return df, classes
    df = df[df[task.time].notna() & df[task.event].notna()].copy()
    times = pd.to_numeric(df[task.time], errors="coerce")
    bad_t = df.loc[~(times > 0), task.slide_col].tolist()
    if bad_t:
        raise TrainingDataError(
            f"{path}: survival time must be > 0 for task {task.name!r}; bad rows (slide ids): {bad_t[:20]}"
        )
    events = pd.to_numeric(df[task.event], errors="coerce")
    bad_e = df.loc[~events.isin([0, 1]), task.slide_col].tolist()
    if bad_e:
        raise TrainingDataError(
            f"{path}: event must be 0 (censored) or 1 (observed) for task {task.name!r}; "
            f"bad rows (slide ids): {bad_e[:20]}"
        )
    df["_time"], df["_event"] = times.astype(float), events.astype(int)
    per_patient = df.groupby("_patient")["_event"].max()
    refuse_no_events(int(per_patient.sum()), len(per_patient), task.name, str(path), str(task.event))
    return df, None


def _task_classes(path: Path, task: TaskConfig, values: pd.Series, slides: pd.Series) -> list[str]:
    """The task's class names in output order: the prompted ones (zero-shot, which must be exactly the sheet's),
    the listed `classes:` (any other value refused), or the sheet's values, sorted, refusing likely typos."""
    present = sorted(values.unique())
    if task.type == "zero-shot":
        classes = [str(c) for c in task.class_prompts or {}]
        unknown, unused = sorted(set(present) - set(classes)), [c for c in classes if c not in set(present)]
        if unknown:
            raise TrainingDataError(
                f"{path}: zero-shot task {task.name!r} has {task.label!r} values {unknown} without class_prompts "
                f"(prompted classes: {classes}); add prompts for them to class_prompts or fix the sheet"
            )
        if unused:
            raise TrainingDataError(
                f"{path}: zero-shot task {task.name!r} prompts class(es) {unused} that no slide has in column "
                f"{task.label!r} (values: {present}); the class_prompts keys must be the label's classes"
            )
        return classes
    if task.classes:
        classes = [str(c) for c in task.classes]
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise TrainingDataError(
                f"{path}: task {task.name!r} has labels {unknown} not in classes {classes}; "
                "fix the sheet or the task's `classes`"
            )
        return classes
    refuse_label_typos(values, slides, str(task.label), task.name, str(path))
    return present


def label_strings(labels: pd.Series) -> pd.Series:
    """Class labels as text; whole numbers read as floats (a label column with blanks: 0.0, 1.0) stay "0", "1"."""
    if pd.api.types.is_float_dtype(labels):
        values = labels.to_numpy(dtype=float)
        if np.isfinite(values).all() and (values == np.round(values)).all():
            return labels.astype("int64").astype(str)
    return labels.astype(str)


def bags_from_sheet(df: pd.DataFrame, task: TaskConfig) -> list[Bag]:
    """One bag per patient (its slides pooled) or per slide; a patient's target must agree across slides."""
    bags = []
    for pid, rows in df.groupby("_patient", sort=True):
        if task.type != "survival":
            if rows["_target"].nunique() > 1:
                raise TrainingDataError(
                    f"patient {pid} has slides with different labels for task {task.name!r}; "
                    "fix the sample sheet (a patient's slides share one label)"
                )
            label, time, event = int(rows["_target"].iloc[0]), None, None
        else:
            if rows["_time"].nunique() > 1 or rows["_event"].nunique() > 1:
                raise TrainingDataError(
                    f"patient {pid} has slides with different survival data for task "
                    f"{task.name!r}; make them agree in the sample sheet"
                )
            label, time, event = None, float(rows["_time"].iloc[0]), int(rows["_event"].iloc[0])
        slides = rows[task.slide_col].tolist()
        if task.pool_slides:
            bags.append(Bag(str(pid), slides, label, time, event, patient_id=str(pid)))
        else:
            bags += [Bag(s, [s], label, time, event, patient_id=str(pid)) for s in slides]
    return bags


def bag_strata(bags: Sequence[Bag], classification: bool) -> list[int]:
    """Per bag, the class index (classification) or the event flag (survival): what splits stratify on and class
    weights count. `bags_from_sheet` sets it on every bag."""
    values = [b.label if classification else b.event for b in bags]
    missing = [b.bag_id for b, v in zip(bags, values, strict=True) if v is None]
    if missing:
        what = "class label" if classification else "event flag"
        raise TrainingDataError(f"{len(missing)} bag(s) have no {what} (first: {missing[0]!r}); check the sheet")
    return [v for v in values if v is not None]


def load_instance_csv(csv_path: str | Path) -> tuple[list[Bag], ArrayStore]:
    """Generic bags from a CSV of instances `label,bag_id,f1,...,fn` (no header), as the classic MIL sets."""
    path = Path(csv_path)
    try:
        raw = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except Exception as exc:
        raise TrainingDataError(f"{path}: cannot parse as numeric CSV label,bag_id,features... ({exc})") from exc
    if raw.shape[1] < 3:
        raise TrainingDataError(f"{path}: needs at least 3 columns (label, bag_id, features)")
    feats = raw[:, 2:].astype(np.float32)
    if not np.isfinite(feats).all():
        raise TrainingDataError(f"{path}: features contain NaN or infinity; clean the file")
    bag_ids = raw[:, 1]
    bags, arrays = [], {}
    _, first = np.unique(bag_ids, return_index=True)
    for b in bag_ids[np.sort(first)]:  # file order
        rows = bag_ids == b
        labels = np.unique(raw[rows, 0])
        if len(labels) != 1:
            raise TrainingDataError(f"{path}: bag {b:g} has instances with different labels {labels.tolist()}")
        key = f"{b:g}" if math.isfinite(b) else str(b)
        arrays[key] = feats[rows]
        bags.append(Bag(key, [key], label=int(labels[0]), lengths=[int(rows.sum())]))
    return bags, ArrayStore(arrays)
