"""The `explain:` config section and concept sets for stage 4 (pydantic models only).

A concept set is a YAML file of named concepts, each with a few phrasings (`prompts`), plus `templates` with one
`{}` that each prompt fills (`"an H&E image of {}."`). Shipped sets live in `workflows/concepts/`; a user set is
a path to a file of the same shape. Reading the files is `explain/concepts.py`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError

PLACEHOLDER = "{}"


class ConceptSpec(BaseModel):
    """One concept: a name and the phrasings a pathologist would use for it (text-encoded and averaged)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="the concept's name in outputs (unique within its set, case-insensitive)")
    prompts: list[str] = Field(..., min_length=1, description="phrasings of the concept; each fills the templates")

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("a concept name is empty; give every concept a name")
        return name.strip()

    @model_validator(mode="after")
    def _prompts_not_empty(self) -> ConceptSpec:
        prompts = [p.strip() for p in self.prompts]
        if any(not p for p in prompts):
            raise ValueError(f"concept {self.name!r} has an empty prompt; remove it or write the phrasing")
        seen: set[str] = set()
        for p in prompts:
            if p.lower() in seen:
                raise ValueError(f"concept {self.name!r} lists the prompt {p!r} twice; remove one")
            seen.add(p.lower())
        self.prompts = prompts
        return self


class ConceptSet(BaseModel):
    """Named concepts sharing prompt templates: every prompt of a concept is put into every template."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="the set's name (the file name without .yaml when not given)")
    description: str = Field("", description="free text; not part of the prompt hash")
    templates: list[str] = Field(
        ..., min_length=1, description='prompt templates, each with exactly one {} (e.g. "an H&E image of {}.")'
    )
    concepts: list[ConceptSpec] = Field(..., min_length=1, description="at least one concept")

    @field_validator("templates")
    @classmethod
    def _one_placeholder(cls, templates: list[str]) -> list[str]:
        out = [t.strip() for t in templates]
        for t in out:
            if t.count(PLACEHOLDER) != 1:
                raise ValueError(f"template {t!r} must contain exactly one {{}} where the prompt goes")
        if len(set(out)) != len(out):
            raise ValueError("a template is listed twice; remove the duplicate")
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> ConceptSet:
        seen: dict[str, str] = {}
        for c in self.concepts:
            key = c.name.casefold()
            if key in seen:
                raise ValueError(
                    f"concept names {seen[key]!r} and {c.name!r} clash (names are case-insensitive); rename one"
                )
            seen[key] = c.name
        return self

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def prompt_texts(self) -> list[list[str]]:
        """Per concept (in set order), its templated prompts: for each prompt, each template, in file order."""
        return [[t.replace(PLACEHOLDER, p) for p in c.prompts for t in self.templates] for c in self.concepts]

    def require_softmax(self) -> ConceptSet:
        """A softmax over concepts (zero-shot classification) needs at least two; one line otherwise."""
        if len(self.concepts) < 2:
            raise ConfigError(
                f"concept set {self.name!r} has {len(self.concepts)} concept; a softmax over concepts needs at "
                "least 2: add concepts to the set or use it for similarity scores only"
            )
        return self


class CaptionerConfig(BaseModel):
    """An image-captioning model (a transformers VisionEncoderDecoder) for the top tiles of each slide."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = Field(None, description="Hugging Face id (from the HF cache; pinned by revision)")
    path: str | None = Field(None, description="local folder holding the model (wins over model_id)")
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = True
    trust_remote_code: bool = False
    tiles_per_slide: int = Field(4, ge=1, le=64, description="top-attention tiles captioned per slide")
    max_new_tokens: int = Field(40, ge=1, le=512)
    num_beams: int = Field(1, ge=1, le=16)

    @model_validator(mode="after")
    def _has_source(self) -> CaptionerConfig:
        if not (self.model_id or self.path):
            raise ValueError("explain.captioner needs model_id or path")
        return self


class ExplainConfig(BaseModel):
    """The `explain:` config section: which concept sets to score tiles and slides against, and how."""

    model_config = ConfigDict(extra="forbid")

    concept_sets: list[str] = Field(
        default_factory=lambda: ["tissue", "lesion"],
        description="shipped concept sets by name (workflows/concepts/NAME.yaml) or paths to YAML concept sets",
    )
    top_k_tiles: int = Field(8, ge=1, le=256, description="top-attention tiles listed (with concepts) per slide")
    heatmap_concepts: int = Field(3, ge=0, le=16, description="concept heatmaps drawn per slide (its top concepts)")
    bootstrap: int = Field(1000, ge=0, description="resamples for the effect-size confidence intervals")
    fdr: float = Field(0.05, gt=0, lt=1, description="false discovery rate for the per-concept rank tests")
    text_batch_size: int = Field(64, ge=1, description="prompts per batch when encoding concept text")
    chunk_rows: int = Field(16384, ge=256, description="feature rows per dask chunk when scoring a cohort")
    captioner: CaptionerConfig | None = Field(None, description="optional: caption the top tiles of each slide")

    @field_validator("concept_sets")
    @classmethod
    def _sets_named(cls, sets: list[str]) -> list[str]:
        out = [s.strip() for s in sets]
        if any(not s for s in out):
            raise ValueError("an entry of concept_sets is empty; give a shipped set name or a YAML path")
        if len(set(out)) != len(out):
            raise ValueError("a concept set is listed twice in concept_sets; remove the duplicate")
        return out
