"""Training: run configuration, presets, the trainer, evaluation and checkpoints."""

from expire_span.training.checkpoint import CheckpointError, load_checkpoint
from expire_span.training.config import RunConfig, TrainConfig
from expire_span.training.evaluate import evaluate
from expire_span.training.presets import DEFAULT_PRESETS, PRESETS, get_preset
from expire_span.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted

__all__ = [
    "DEFAULT_PRESETS",
    "PRESETS",
    "CheckpointError",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "get_preset",
    "load_checkpoint",
]
