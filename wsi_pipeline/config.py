"""The pipeline configuration: the stage sections composed into one model, validated once, shared by the CLI and
Snakemake. Each stage's section lives in that stage's `config.py` (pydantic models only).

`workflows/config.yaml` holds the defaults; `workflows/schemas/config.schema.json` is generated from these models
(`wsi-pipeline schema`) so editors and Snakemake's `validate` see the same rules. YAML is read by io/yamlio.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .encode.config import EncodeParams
from .encoders.config import EncoderConfig
from .errors import ConfigError
from .explain.config import ExplainConfig
from .io.yamlio import read_yaml_mapping
from .mil.config import MILConfig
from .tiling.config import DEFAULT_BACKEND, Backend, TilingParams, TissueParams

if TYPE_CHECKING:
    import pandas as pd


class PipelineConfig(BaseModel):
    """Everything a run needs. Relative paths are relative to the working directory (the repo for Snakemake)."""

    model_config = ConfigDict(extra="forbid")

    samples: str | None = Field(
        None,
        description="sample sheet CSV (slide_id,path[,mpp,patient_id,labels...]) "
        "or a glob of slide files such as /data/*.svs",
    )
    results: str = Field("results", description="output folder")
    backend: Backend = Field(DEFAULT_BACKEND, description="slide reader")
    tiling: TilingParams = Field(default_factory=TilingParams)
    tissue: TissueParams = Field(default_factory=TissueParams)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    encode: EncodeParams = Field(default_factory=EncodeParams)
    mil: MILConfig = Field(default_factory=MILConfig)
    explain: ExplainConfig | None = Field(
        None, description="stage 4: concept scores, zero-shot and explained MIL tasks (none: not run)"
    )

    @model_validator(mode="after")
    def _tasks_have_their_concepts(self) -> PipelineConfig:
        from .encoders.text_registry import no_text_tower_message, text_tower_builder

        zero_shot = [t.name for t in self.mil.tasks if t.type == "zero-shot"]
        if (self.explain or zero_shot) and text_tower_builder(self.encoder.name) is None:
            needs = "the explain: section" if self.explain else f"zero-shot task {zero_shot[0]!r}"
            raise ValueError(f"{needs} needs a text tower: {no_text_tower_message(self.encoder.name)}")
        scored = self.explain.concept_sets if self.explain else []
        for task in self.mil.tasks:
            wanted = task.concept_features
            if wanted and wanted not in scored:
                raise ValueError(
                    f"task {task.name!r} learns from concept set {wanted!r}, which is not in explain.concept_sets "
                    f"({', '.join(scored) or 'no explain: section'}); add it there"
                )
        return self

    def cohort(self) -> pd.DataFrame:
        """The validated cohort table, indexed by slide_id: `samples` is a CSV sheet, or else a glob of slides."""
        from .slide.cohort import cohort_from_glob, read_sample_sheet  # pandas: only for jobs that need the cohort

        if not self.samples:
            raise ConfigError("config: 'samples' is not set; give a sample sheet CSV or a glob such as /data/*.svs")
        if self.samples.lower().endswith(".csv"):
            return read_sample_sheet(self.samples)
        return cohort_from_glob(self.samples)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML (or JSON) config file as a dict; a missing or unparsable file is one `ConfigError` line."""
    return read_yaml_mapping(
        path,
        missing_hint="pass --config with a YAML file like workflows/config.yaml",
        mapping_hint="a config must be a mapping of sections (samples:, tiling:, ...)",
    )


# The first line of a run settings snapshot (run_settings.py): it sits in RESULTS/settings/, and its results folder
# is the one it sits in, so a results folder moved or copied elsewhere keeps its snapshots (and its work).
SNAPSHOT_HEADER = "# wsi-pipeline run settings"


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """Validate a YAML file or a dict (e.g. Snakemake's `config`); errors become one `ConfigError` line."""
    name = "config"
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        name = str(source)
        data = read_yaml(source)
        with open(source) as handle:
            if handle.readline().startswith(SNAPSHOT_HEADER):
                data.setdefault("results", str(Path(source).resolve().parent.parent))
    data.update(overrides or {})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{name}: " + "; ".join(parts)) from None


def config_json_schema() -> dict[str, Any]:
    return PipelineConfig.model_json_schema()


def write_run_config(cfg: PipelineConfig | dict[str, Any], path: Path) -> Path:
    """Write the whole effective config (after all overrides) as the record of a run; left as it is when unchanged,
    so a rerun over finished results on a read-only share writes nothing. No job reads it: jobs read their settings
    snapshot (run_settings.py)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, PipelineConfig) else cfg
    text = yaml.safe_dump(data, sort_keys=True)
    try:
        unchanged = path.is_file() and path.read_text() == text
    except OSError:
        unchanged = False
    if not unchanged:
        write_config_text(path, text)
    return path


def write_config_text(path: Path, text: str) -> None:
    """`text` to `path` atomically; a write that is impossible (read-only, full, a file in the way) is one
    `ConfigError` line naming the folder and the fix."""
    from .io.atomic import write_bytes_atomic
    from .io.faults import describe_os_error

    try:
        write_bytes_atomic(path, text.encode())
    except OSError as err:
        raise ConfigError(
            describe_os_error(err, path.parent, elsewhere="set results: in the config to another folder")
        ) from None
