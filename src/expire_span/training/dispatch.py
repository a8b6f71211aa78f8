"""Which trainer and which evaluation a task needs: token streams or environments."""

from __future__ import annotations

from expire_span.model import MemoryAgent, MemoryTransformer
from expire_span.tasks import RLTask, is_rl_task
from expire_span.training.config import RunConfig
from expire_span.training.evaluate import evaluate
from expire_span.training.loop import TrainingLoop
from expire_span.training.ppo import RLTrainer
from expire_span.training.rollout import evaluate_agent
from expire_span.training.trainer import Trainer


def trainer_class(task: str) -> type[TrainingLoop]:
    """:class:`RLTrainer` for reinforcement-learning tasks, :class:`Trainer` for the others."""
    return RLTrainer if is_rl_task(task) else Trainer


def evaluate_run(
    model: MemoryTransformer | MemoryAgent,
    run: RunConfig,
    split: str,
    batch_size: int,
    batches: int,
    progress: bool = False,
) -> dict[str, float]:
    """Evaluate a saved run's network on ``split``: ``batches`` batches of ``batch_size`` streams
    for a sequence task, ``batches`` episodes in each of ``batch_size`` environments (seeded for
    the split, never with training seeds, memory carried across them when the run carried it)
    for an RL task."""
    task = run.build_task()
    if isinstance(task, RLTask):
        rl = run.rl_config
        return evaluate_agent(model, task, split, batch_size, batches, run.train.seed,
                              rl.eval_greedy, progress, rl.carry_memory)
    return evaluate(model, task, split, batch_size, run.seq_len, batches, progress)
