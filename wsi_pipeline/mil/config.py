"""Task and training settings for stage 3 (MIL). Plain pydantic models so a YAML/JSON config maps onto them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigError, PipelineError
from .models import model_names


class TaskConfig(BaseModel):
    """One prediction task on a cohort: which sample-sheet columns hold the target."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["classification", "survival", "zero-shot"] = "classification"
    label: str | None = None  # classification / zero-shot: column with the class (name or integer code)
    time: str | None = None  # survival: follow-up time (> 0)
    event: str | None = None  # survival: 1 = event observed, 0 = censored
    classes: list[str] | None = None  # class names, in output order; inferred (sorted) when omitted
    slide_col: str = "slide_id"
    patient_col: str | None = "patient_id"  # None: every slide is its own patient
    pool_slides: bool = True  # one bag per patient (slides pooled); False: one bag per slide, split by patient
    # Which tile features the task learns from: the encoder's ("raw"), or a concept set's tile scores
    # ("concepts:tissue"): a concept-bottleneck model, interpretable by construction.
    features: str = "raw"
    # zero-shot (MI-Zero, no training): class (as in the label column) -> phrasings of it; each phrasing fills
    # every template; a slide's class score pools its tiles' similarities with the class (mean of the top K).
    class_prompts: dict[str, list[str]] | None = None
    templates: list[str] = Field(
        default_factory=lambda: ["an H&E image of {}.", "a histopathology image of {}."],
        description="zero-shot prompt templates, each with one {}",
    )
    top_k: list[int] = Field(default_factory=lambda: [1, 5, 10, 50, 100], description="zero-shot top-K poolings")
    primary_k: int = Field(10, ge=1, description="zero-shot: the K whose predictions summary.json reports")

    @model_validator(mode="after")
    def _columns_for_type(self) -> TaskConfig:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"task name {self.name!r} must be alphanumeric (with - or _): it names folders")
        if self.type == "classification" and not self.label:
            raise ValueError(f"task {self.name!r}: a classification task needs `label` (a sample-sheet column)")
        if self.type == "survival" and not (self.time and self.event):
            raise ValueError(f"task {self.name!r}: a survival task needs `time` and `event` columns")
        if self.type == "zero-shot":
            self._check_zero_shot()
        if self.features != "raw" and not (self.features.startswith("concepts:") and self.features[9:].strip()):
            raise ValueError(
                f"task {self.name!r}: features {self.features!r} must be 'raw' or 'concepts:<concept set>'"
            )
        return self

    def _check_zero_shot(self) -> None:
        if not self.label:
            raise ValueError(f"task {self.name!r}: a zero-shot task needs `label` (the column it is scored against)")
        prompts = self.class_prompts or {}
        if len(prompts) < 2:
            raise ValueError(
                f"task {self.name!r}: a zero-shot task needs class_prompts for at least 2 classes "
                "(class -> list of phrasings)"
            )
        for cls, phrasings in prompts.items():
            if not phrasings or any(not str(p).strip() for p in phrasings):
                raise ValueError(f"task {self.name!r}: class {cls!r} has no or an empty prompt in class_prompts")
        if self.classes is not None and [str(c) for c in self.classes] != [str(c) for c in prompts]:
            raise ValueError(f"task {self.name!r}: classes {self.classes} differ from the class_prompts keys")
        if any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"task {self.name!r}: every zero-shot template needs exactly one {{}}")
        if any(k < 1 for k in self.top_k):
            raise ValueError(f"task {self.name!r}: top_k values must be >= 1")
        self.top_k = sorted(set(self.top_k) | {self.primary_k})
        if self.features != "raw":
            raise ValueError(f"task {self.name!r}: a zero-shot task scores the encoder's own features; drop `features`")

    @property
    def concept_features(self) -> str | None:
        """The concept set a concept-bottleneck task learns from, or None for the encoder's features."""
        return self.features.split(":", 1)[1].strip() if self.features.startswith("concepts:") else None


class TrainConfig(BaseModel):
    """How to train: model, optimiser, schedule, cross-validation and bag sampling."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "abmil-gated",
        description="a registered MIL model: abmil, abmil-gated, transmil, mean, max, "
        "or one added in wsi_pipeline/mil/models/",
    )
    model_args: dict[str, Any] = Field(default_factory=dict, description="extra settings for the model's builder")
    hidden_dim: int = Field(128, ge=1)
    attn_dim: int = Field(128, ge=1)
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    encoder_layers: int = Field(1, ge=1)  # fc+ReLU layers applied to each instance before pooling
    n_layers: int = Field(2, ge=1)  # transmil only
    n_heads: int = Field(4, ge=1)  # transmil only
    ppeg: bool = False  # transmil only: positional conv over the square-padded token grid
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)  # early stopping on the validation metric
    min_epochs: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)  # bags per step; survival with the Cox loss needs > 1
    max_instances: int | None = Field(8192, ge=1)  # bag sampling during training (None = all tiles)
    instance_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of tiles dropped per training bag
    class_weights: bool = True  # inverse-frequency weights for imbalanced classes
    survival_loss: Literal["nll", "cox"] = "nll"
    n_bins: int = Field(4, ge=2)  # discrete-time NLL: bins from quantiles of observed event times
    nll_alpha: float = Field(0.0, ge=0.0, le=1.0)  # weight of the uncensored-only term (Chen et al.)
    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0])  # repeats of the k-fold split
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)  # of each training fold, for early stopping
    seed: int = 0  # model initialisation and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on GPU only
    standardize: bool = False  # z-score features with training-fold statistics
    cache_bytes: int = Field(2 * 1024**3, ge=0)  # in-memory bag cache; 0 disables
    loader_threads: int = Field(2, ge=0)  # threads reading the next bags while the model trains; 0 = in line
    num_threads: int | None = None
    quiet: bool = False
    bootstrap: int = Field(1000, ge=0)  # resamples for the confidence intervals in the summary

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in model_names():
            raise ValueError(f"unknown MIL model {name!r}; available: {', '.join(model_names())}")
        return name


class MILConfig(BaseModel):
    """The `mil:` config section: prediction tasks on the sample sheet and how to train them."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskConfig] = Field(default_factory=list, description="no tasks: the workflow stops after encoding")
    train: TrainConfig = Field(default_factory=TrainConfig)
    heatmap_top_k: int = Field(8, ge=0, le=64, description="tiles in each slide's top-attention gallery")

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise PipelineError(f"no task named {name!r} in the mil.tasks config; known: {[t.name for t in self.tasks]}")

    @property
    def n_splits(self) -> int:
        return self.train.folds * len(self.train.seeds)


def as_task(cfg: TaskConfig | dict[str, Any]) -> TaskConfig:
    return _coerce(TaskConfig, cfg, "task")


def as_train(cfg: TrainConfig | dict[str, Any] | None) -> TrainConfig:
    return _coerce(TrainConfig, cfg or {}, "training")


def _coerce(cls: type[BaseModel], cfg: Any, what: str) -> Any:
    if isinstance(cfg, cls):
        return cfg
    try:
        return cls.model_validate(cfg)
    except Exception as exc:  # pydantic's message is multi-line; keep the first useful part
        first = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) if len(first) > 1 else str(exc)
        raise ConfigError(f"invalid {what} config: {detail}; fix the {what} section of the config") from exc
