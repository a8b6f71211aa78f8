"""Training: run configuration, presets, the trainers (sequence tasks, PPO for RL tasks),
evaluation and checkpoints."""

from expire_span.training.checkpoint import CheckpointError, load_checkpoint
from expire_span.training.config import RLConfig, RunConfig, TrainConfig
from expire_span.training.dispatch import evaluate_run, trainer_class
from expire_span.training.evaluate import evaluate
from expire_span.training.loop import TrainingDiverged, TrainingInterrupted, TrainingLoop
from expire_span.training.ppo import RLTrainer
from expire_span.training.presets import DEFAULT_PRESETS, PRESETS, get_preset
from expire_span.training.trainer import Trainer

__all__ = [
    "DEFAULT_PRESETS",
    "PRESETS",
    "CheckpointError",
    "RLConfig",
    "RLTrainer",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingLoop",
    "evaluate",
    "evaluate_run",
    "get_preset",
    "load_checkpoint",
    "trainer_class",
]
