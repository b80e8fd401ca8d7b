"""Every path under the results folder and every status word, in one place.

results/
  tiles/{slide}.zarr, tiles/{slide}.json          stage 1 store + sidecar
  qc/{slide}/                                     thumbnails, mask, tissue polygons
  features/{encoder}/{slide}.zarr|.json           stage 2 store + sidecar (+ .locks/, {slide}.parts/, shards/)
  mil/{task}/                                     stage 3: sheet (+ features.json), splits, folds, summary, heatmaps
  mil/tasks.csv                                   every task's headline metric, side by side
  attention/{task}/{slide}.zarr                   per-tile attention of the fold that tested the slide
  explain/{encoder}/{concept_set}/{slide}.zarr|.json  stage 4 tile concept scores + sidecar (+ cohort.csv)
  explain/{encoder}/text/                         cached concept text embeddings (per revision and prompt hash)
  mil/{task}/explain/                             stage 4 for a task: concepts.csv, slides/*.json, index.html
  settings/{scope}-{digest}.yaml                  the settings each job reads, written once (run_settings.py)
  report.csv|html, run_config.yaml (the last run's whole config, a record), logs/, .gpu_locks/
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# A slide's status, the same word in every stage's sidecar and in the report.
STATUS_OK = "ok"
STATUS_NO_TISSUE = "no tissue"  # stage 1 found no tissue; stage 2 writes an empty store and says the same
STATUS_SKIPPED = "skipped"  # stage 2 had nothing to read: stage 1 failed or never ran for the slide
STATUS_FAILED = "failed"
STATUSES = (STATUS_OK, STATUS_NO_TISSUE, STATUS_SKIPPED, STATUS_FAILED)


@dataclass(frozen=True)
class ResultsLayout:
    """Paths of one results folder: `ResultsLayout("results").tile_store("demo_000")`."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    def rel(self, path: Path) -> str:
        """`path` relative to the results folder (what sidecars record, so a moved folder stays readable)."""
        return os.path.relpath(path, self.root)

    # stage 1
    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    def tile_store(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.zarr"

    def tile_sidecar(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.json"

    def tile_lock(self, slide_id: str) -> Path:
        return self.tiles_dir / ".locks" / f"{slide_id}.lock"

    def qc_dir(self, slide_id: str) -> Path:
        return self.root / "qc" / slide_id

    # stage 2
    def feature_dir(self, encoder: str) -> Path:
        return self.root / "features" / encoder

    def feature_store(self, encoder: str, slide_id: str) -> Path:
        return self.feature_dir(encoder) / f"{slide_id}.zarr"

    def feature_sidecar(self, encoder: str, slide_id: str) -> Path:
        return self.feature_dir(encoder) / f"{slide_id}.json"

    def feature_lock(self, encoder: str, slide_id: str) -> Path:
        return self.feature_dir(encoder) / ".locks" / f"{slide_id}.lock"

    def feature_parts(self, encoder: str, slide_id: str) -> Path:
        return self.feature_dir(encoder) / f"{slide_id}.parts"

    def encode_shard_summary(self, encoder: str, shard: int, n_shards: int) -> Path:
        return self.feature_dir(encoder) / "shards" / f"{shard}-of-{n_shards}.json"

    def encode_devices_log(self, encoder: str) -> Path:
        return self.root / "logs" / "encode" / f"{encoder}-devices.json"

    @property
    def gpu_locks(self) -> Path:
        return self.root / ".gpu_locks"

    # stage 3
    def task_dir(self, task: str) -> Path:
        return self.root / "mil" / task

    @property
    def tasks_table(self) -> Path:
        """Every task's headline metric in one table (trained, zero-shot and concept-bottleneck tasks)."""
        return self.root / "mil" / "tasks.csv"

    def task_features_record(self, task: str) -> Path:
        """Which feature store (its `store_id`) each slide of the task's sheet was, when the sheet was written."""
        return self.task_dir(task) / "features.json"

    def attention_dir(self, task: str) -> Path:
        return self.root / "attention" / task

    def heatmap_dir(self, task: str) -> Path:
        return self.task_dir(task) / "heatmaps"

    # stage 4 (explain)
    def concept_dir(self, encoder: str, concept_set: str) -> Path:
        return self.root / "explain" / encoder / concept_set

    def concept_store(self, encoder: str, concept_set: str, slide_id: str) -> Path:
        return self.concept_dir(encoder, concept_set) / f"{slide_id}.zarr"

    def concept_sidecar(self, encoder: str, concept_set: str, slide_id: str) -> Path:
        return self.concept_dir(encoder, concept_set) / f"{slide_id}.json"

    def concept_summary(self, encoder: str, concept_set: str) -> Path:
        """One row per slide (status, tiles, reason): written when a cohort is scored against a concept set."""
        return self.concept_dir(encoder, concept_set) / "cohort.csv"

    def text_cache_dir(self, encoder: str) -> Path:
        return self.root / "explain" / encoder / "text"

    def task_explain_dir(self, task: str) -> Path:
        return self.task_dir(task) / "explain"

    # cohort
    @property
    def report_csv(self) -> Path:
        return self.root / "report.csv"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def run_config(self) -> Path:
        """The whole config of the last run started here: a record for people; no job reads it."""
        return self.root / "run_config.yaml"

    @property
    def settings_dir(self) -> Path:
        return self.root / "settings"

    def settings_file(self, name: str) -> Path:
        """A run settings snapshot, `name` = `{scope}-{digest}` (wsi_pipeline/run_settings.py)."""
        return self.settings_dir / f"{name}.yaml"
