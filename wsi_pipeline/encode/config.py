"""The `encode:` config section (pydantic only): how tiles are batched, where they run, how features are stored.

A new batching or storage setting is a field here; `encode_slide`, `encode_slides` and the workflow's jobs take
the whole section, and the CLI and Python callers may override any field by name."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..machine import usable_cpus


class EncodeParams(BaseModel):
    """The `encode:` config section."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, le=8192, description="tiles per batch (halved automatically on CUDA OOM)")
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="tile-reading processes per device (0: read inline; auto: one per CPU this job may use beyond "
        "the main process, at most 4)",
    )
    prefetch_factor: int = Field(2, ge=1, le=16, description="batches each reader keeps ready")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, or cuda:N")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored feature dtype")
    split_threshold: int | None = Field(
        None,
        ge=1,
        description="split slides with more tiles than this across devices (default: the per-device fair share)",
    )
    jobs: int = Field(
        1,
        ge=1,
        le=10000,
        description="workflow jobs the cohort is split into (by tile count); on a cluster, one per GPU node",
    )
    gpus_per_job: int = Field(1, ge=1, le=64, description="GPUs each encode job uses (one model load each)")

    @field_validator("num_workers")
    @classmethod
    def _workers_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError("num_workers must be 0-64 or 'auto'")
        return v

    def reader_processes(self) -> int:
        """The number of tile-reading processes: `num_workers`, or for `auto` one per usable CPU beyond the main
        process (SLURM's allocation and CPU affinity included), at most 4 — never more readers than cores."""
        if isinstance(self.num_workers, int):
            return self.num_workers
        return max(0, min(4, usable_cpus() - 1))

    def with_overrides(self, **overrides: Any) -> EncodeParams:
        """A validated copy with the given fields replaced (None values are ignored)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return self if not changes else EncodeParams.model_validate({**self.model_dump(), **changes})
