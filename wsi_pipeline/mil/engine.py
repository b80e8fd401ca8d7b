"""The training loop shared by cohort tasks and the classic-MIL benchmark: batching, fit, predict.

AdamW with a per-step cosine schedule, early stopping on the validation metric (loss breaks ties), fixed seeds,
mixed precision on GPU only. Bags are fetched from a `BagStore` batch by batch, never all at once.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..devices import resolve_device  # one device rule for every stage
from ..errors import TrainingDataError
from .bags import Bag, BagStore, prefetch
from .config import TrainConfig
from .losses import cox_loss, cross_entropy, discrete_nll, hazard_risk, to_bin
from .metrics import c_index, classification_metrics
from .models import build_model


@dataclass
class Problem:
    """What the model predicts and how it is scored."""

    kind: str  # classification | survival
    loss: str  # ce | nll | cox
    n_out: int
    classes: list[str] | None = None
    edges: list[float] = field(default_factory=list)  # discrete-time bins (nll)
    class_weight: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "loss": self.loss,
            "n_out": self.n_out,
            "classes": self.classes,
            "edges": self.edges,
            "class_weight": self.class_weight,
        }


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_spec(cfg: TrainConfig, in_dim: int, problem: Problem) -> dict[str, Any]:
    """What a checkpoint stores to rebuild its model: the `mil.train` settings models read, plus `model_args`."""
    keys = (
        "model",
        "hidden_dim",
        "attn_dim",
        "dropout",
        "encoder_layers",
        "n_layers",
        "n_heads",
        "ppeg",
        "standardize",
    )
    return {k: getattr(cfg, k) for k in keys} | cfg.model_args | {"in_dim": in_dim, "n_out": problem.n_out}


class Normalized(torch.nn.Module):
    """Feature standardisation (training-fold statistics, stored with the weights) in front of a MIL model."""

    mean: torch.Tensor  # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, core: torch.nn.Module, in_dim: int) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False) -> Any:
        return self.core((x - self.mean) / self.std, mask, return_attention)


def make_model(spec: dict[str, Any]) -> torch.nn.Module:
    core = build_model(spec)
    return Normalized(core, int(spec["in_dim"])) if spec.get("standardize") else core


def feature_stats(store: BagStore, bags: list[Bag], threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over all training instances, streamed bag by bag (float64 sums)."""
    total: np.ndarray | None = None
    sq: np.ndarray | None = None
    n = 0
    with closing(prefetch(store, bags, threads)) as reader:  # an error stops the reader threads at once
        for features in reader:
            x = features.astype(np.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x**2).sum(0) if sq is None else sq + (x**2).sum(0)
            n += len(x)
    if total is None or sq is None:
        raise TrainingDataError("feature statistics need at least one training bag; the training set is empty")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0))
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def sample_instances(x: np.ndarray, rng: np.random.Generator, max_instances: int | None, drop: float) -> np.ndarray:
    """Training-time bag sampling: drop a random fraction of instances, then cap the bag size."""
    n = len(x)
    keep = n
    if drop > 0:
        keep = max(1, int(round(n * (1 - drop))))
    if max_instances:
        keep = min(keep, max_instances)
    if keep >= n:
        return x
    return x[np.sort(rng.choice(n, keep, replace=False))]


def collate(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bags to one (B, Nmax, D) tensor and a mask of real instances."""
    n_max = max(len(a) for a in arrays)
    x = np.zeros((len(arrays), n_max, arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), n_max), dtype=bool)
    for i, a in enumerate(arrays):
        x[i, : len(a)] = a
        mask[i, : len(a)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def _targets(bags: list[Bag], problem: Problem) -> dict[str, torch.Tensor]:
    if problem.kind == "classification":
        return {"label": torch.tensor([b.label for b in bags])}
    times = np.array([b.time for b in bags], dtype=float)
    return {
        "time": torch.tensor(times),
        "event": torch.tensor([b.event for b in bags]),
        "bin": torch.from_numpy(to_bin(times, np.asarray(problem.edges))),
    }


def compute_loss(
    logits: torch.Tensor, tgt: dict[str, torch.Tensor], problem: Problem, weight: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    if problem.loss == "ce":
        return cross_entropy(logits, tgt["label"], weight)
    if problem.loss == "nll":
        return discrete_nll(logits, tgt["bin"], tgt["event"], alpha)
    return cox_loss(logits[:, 0], tgt["time"], tgt["event"])


def outputs_to_scores(logits: torch.Tensor, problem: Problem) -> np.ndarray:
    """Class probabilities (B, C) or a risk per bag (B,) where higher = earlier event."""
    if problem.kind == "classification":
        return torch.softmax(logits.float(), dim=1).cpu().numpy()
    if problem.loss == "nll":
        return hazard_risk(logits).cpu().numpy()
    return logits[:, 0].float().cpu().numpy()


@torch.no_grad()
def predict_bags(
    model: torch.nn.Module,
    store: BagStore,
    bags: list[Bag],
    problem: Problem,
    device: torch.device,
    attention: bool = False,
    amp: bool = True,
    threads: int = 2,
) -> dict[str, Any]:
    """Scores for each bag (one bag per forward pass: no padding, any bag size) and optionally attention."""
    model.eval()
    attn: list[np.ndarray] = []
    logits_all: list[torch.Tensor] = []
    use_amp = amp and device.type == "cuda"
    with closing(prefetch(store, bags, threads)) as reader:
        for features in reader:
            x = torch.from_numpy(features).to(device)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(x, None, return_attention=attention)
            logits = out[0] if attention else out
            logits_all.append(logits.float())
            if attention:
                attn.append(out[1][0].float().cpu().numpy())
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, problem.n_out)
    scores = outputs_to_scores(logits, problem)
    return {"scores": scores, "logits": logits.cpu(), "attention": attn}


def evaluate(
    scores: np.ndarray, logits: torch.Tensor, bags: list[Bag], problem: Problem, alpha: float = 0.0
) -> dict[str, float]:
    """Validation loss and metric (AUC or C-index; NaN when undefined on this subset)."""
    tgt = _targets(bags, problem)
    loss = float(compute_loss(logits, tgt, problem, None, alpha)) if len(bags) else float("nan")
    if problem.kind == "classification":
        metric = classification_metrics(tgt["label"].numpy(), scores, problem.n_out)["auc"]
    else:
        ev = tgt["event"].numpy()
        metric = c_index(tgt["time"].numpy(), ev, scores) if ev.sum() else float("nan")
    return {"loss": loss, "metric": metric}


def fit(
    spec: dict[str, Any],
    store: BagStore,
    train: list[Bag],
    val: list[Bag],
    problem: Problem,
    cfg: TrainConfig,
    label: str = "",
    monitor: str = "metric",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one model; with a validation set, keep the best epoch (metric, then loss) and stop early.

    Without one, train `cfg.epochs` epochs and keep the last. Returns the model (on its device) and a history.
    """
    previous_threads = torch.get_num_threads()
    if cfg.num_threads:  # small models on a busy CPU run far faster on one thread; restored on return
        torch.set_num_threads(cfg.num_threads)
    try:
        return _fit(spec, store, train, val, problem, cfg, label, monitor)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    spec: dict[str, Any],
    store: BagStore,
    train: list[Bag],
    val: list[Bag],
    problem: Problem,
    cfg: TrainConfig,
    label: str,
    monitor: str,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = make_model(spec)
    if isinstance(model, Normalized):  # spec["standardize"]
        mean, std = feature_stats(store, train, cfg.loader_threads)
        model.mean.copy_(torch.from_numpy(mean))
        model.std.copy_(torch.from_numpy(std))
    model.to(device)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    weight = torch.tensor(problem.class_weight, device=device) if problem.class_weight else None
    best: tuple[float, float] = (-math.inf, -math.inf)
    best_state, best_epoch, history = None, 0, []
    progress = _progress(cfg.quiet)
    task_id = progress.add_task(label or "train", total=cfg.epochs) if progress else None
    reader = None
    try:
        for epoch in range(cfg.epochs):
            model.train()
            order = rng.permutation(len(train))
            reader = prefetch(store, [train[i] for i in order], cfg.loader_threads)
            total = 0.0
            for s in range(steps_per_epoch):
                chunk = [train[i] for i in order[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
                arrays = [sample_instances(next(reader), rng, cfg.max_instances, cfg.instance_dropout) for _ in chunk]
                x, mask = collate(arrays)
                tgt = {k: v.to(device) for k, v in _targets(chunk, problem).items()}
                with torch.autocast(device.type, enabled=use_amp):
                    logits = model(x.to(device, non_blocking=True), mask.to(device))
                loss = compute_loss(logits, tgt, problem, weight, cfg.nll_alpha)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                total += float(loss.detach()) * len(chunk)
            reader.close()  # every bag consumed: release the reader threads before validation starts its own
            record = {"epoch": epoch + 1, "train_loss": total / len(train)}
            if val:
                pred = predict_bags(model, store, val, problem, device, amp=cfg.amp, threads=cfg.loader_threads)
                ev = evaluate(pred["scores"], pred["logits"], val, problem, cfg.nll_alpha)
                record |= {"val_loss": ev["loss"], "val_metric": ev["metric"]}
                metric = ev["metric"] if monitor == "metric" and math.isfinite(ev["metric"]) else -math.inf
                key = (metric, -ev["loss"])
                if key > best:
                    best, best_epoch = key, epoch + 1
                    best_state = copy.deepcopy(model.state_dict())
            history.append(record)
            if progress:
                desc = f"{label} loss {record['train_loss']:.3f}"
                if val:
                    desc += f" val {record['val_loss']:.3f}/{record['val_metric']:.3f}"
                progress.update(task_id, advance=1, description=desc)
            if val and epoch + 1 >= cfg.min_epochs and epoch + 1 - best_epoch >= cfg.patience:
                break
    finally:
        if reader is not None:  # an error mid-epoch: stop the reader threads now, not at garbage collection
            reader.close()
        if progress:
            progress.stop()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"history": history, "best_epoch": best_epoch or len(history), "device": str(device)}


def _progress(quiet: bool) -> Any:
    if quiet:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress.start()
    return progress
