"""Training: the loop, its guards and schedules."""

from stabq.training.config import TrainConfig, TrainResult
from stabq.training.guard import StabilityGuard
from stabq.training.loop import evaluate_model, train

__all__ = ["StabilityGuard", "TrainConfig", "TrainResult", "evaluate_model", "train"]
