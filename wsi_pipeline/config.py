"""The pipeline configuration: one pydantic model per stage, validated once, shared by the CLI and Snakemake.

`workflows/config.yaml` holds the defaults; `workflows/schemas/config.schema.json` is generated from these models
(`wsi-pipeline schema`) so editors and Snakemake's `validate` see the same rules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cohort import cohort_from_glob, read_sample_sheet
from .encode_stage import EncodeParams
from .encoders import EncoderConfig
from .errors import ConfigError
from .mil.workflow import MILConfig
from .tiling import TilingParams
from .tissue import TissueParams


class PipelineConfig(BaseModel):
    """Everything a run needs. Relative paths are relative to the working directory (the repo for Snakemake)."""

    model_config = ConfigDict(extra="forbid")

    samples: str | None = Field(None, description="sample sheet CSV (slide_id,path[,mpp,patient_id,labels...]) "
                                "or a glob of slide files such as /data/*.svs")
    results: str = Field("results", description="output folder")
    backend: Literal["auto", "openslide", "tiffslide"] = Field("auto", description="slide reader")
    tiling: TilingParams = Field(default_factory=TilingParams)
    tissue: TissueParams = Field(default_factory=TissueParams)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    encode: EncodeParams = Field(default_factory=EncodeParams)
    mil: MILConfig = Field(default_factory=MILConfig)

    def cohort(self) -> pd.DataFrame:
        """The validated cohort table, indexed by slide_id: `samples` is a CSV sheet, or else a glob of slides."""
        if not self.samples:
            raise ConfigError("config: 'samples' is not set; give a sample sheet CSV or a glob such as /data/*.svs")
        if self.samples.lower().endswith(".csv"):
            return read_sample_sheet(self.samples)
        return cohort_from_glob(self.samples)


def load_config(source: str | os.PathLike[str] | dict[str, Any], overrides: dict[str, Any] | None = None
                ) -> PipelineConfig:
    """Validate a YAML file or a dict (e.g. Snakemake's `config`); errors become one `ConfigError` line."""
    name = "config"
    if isinstance(source, dict):
        data = dict(source)
    else:
        name = str(source)
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass --config with a YAML file like "
                              "workflows/config.yaml")
        data = yaml.safe_load(path.read_text()) or {}
    data.update(overrides or {})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{name}: " + "; ".join(parts)) from None


def config_json_schema() -> dict[str, Any]:
    return PipelineConfig.model_json_schema()
