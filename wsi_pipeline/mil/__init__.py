"""Stage 3: attention-MIL on tile features — bags, splits, models, losses, training, metrics, benchmark."""

from .bench import bench_mil
from .config import TaskConfig, TrainConfig
from .evaluate import evaluate_task
from .models import ABMIL, PoolMIL, TransMIL, build_model
from .plots import attention_heatmap
from .train import predict, train_task

__all__ = ["ABMIL", "PoolMIL", "TaskConfig", "TrainConfig", "TransMIL", "attention_heatmap", "bench_mil",
           "build_model", "evaluate_task", "predict", "train_task"]
