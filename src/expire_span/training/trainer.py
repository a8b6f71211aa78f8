"""The training loop for sequence tasks: token streams read in batches, memory carried across.

It knows nothing about memory policies: it adds ``out.aux_loss`` to the task loss, reports
``out.memory_size`` and calls ``model.after_optimizer_step()``. What all trainers share (resume,
checkpoints, logging, signals, divergence checks) is in :mod:`expire_span.training.loop`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from expire_span.tasks import MetricAccumulator, SequenceTask, Shard
from expire_span.training.config import RunConfig
from expire_span.training.evaluate import evaluate, forget_restarted_rows
from expire_span.training.loop import TrainingLoop


class Trainer(TrainingLoop):
    """Trains a :class:`MemoryTransformer` on a :class:`SequenceTask` into ``out_dir``.

    Arguments as :class:`~expire_span.training.loop.TrainingLoop`, plus ``shard``: the rows of
    the global batch this process reads (all of them by default).
    """

    task: SequenceTask

    def __init__(self, run: RunConfig | None, out_dir: str | Path, *, shard: Shard | None = None,
                 **options: Any) -> None:
        self._shard = shard
        super().__init__(run, out_dir, **options)

    def _setup(self) -> None:
        self.shard = self._shard or Shard(self.train_cfg.batch_size)
        self.rows = self.shard.batch_size
        self.interval = _Interval()

    def evaluate(self, split: str = "valid", progress: bool = False) -> dict[str, float]:
        return evaluate(
            self.model, self.task, split, self.run.eval_batch_size, self.run.seq_len,
            self.train_cfg.eval_batches, progress=progress,
        )

    def _train_step(self, step: int) -> None:
        batch = self.task.batch("train", step, self.shard.rows, self.run.seq_len).to(self.device)
        self.model.train()
        out = self.model(batch.tokens, forget_restarted_rows(self.memory, batch))
        task_loss = self.interval.metrics.update(out.logits, batch)
        self._update(task_loss + out.aux_loss, step)
        self.memory = out.memory
        self.interval.add(out, batch.tokens.numel())

    def _log_record(self, step: int) -> dict[str, Any]:
        return self.interval.flush(self.task, step, self.scheduler.get_last_lr()[0])

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{record['loss']:.3f}"}
        if not math.isnan(record.get("accuracy", math.nan)):
            postfix["acc"] = f"{record['accuracy']:.3f}"
        postfix["mem"] = f"{record['memory_size']:.0f}/{self.model.config.max_span}"
        return postfix


class _Interval:
    """Training statistics since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.metrics = MetricAccumulator()
        self.steps = 0
        self.tokens = 0
        self.aux = 0.0
        self.memory_size: torch.Tensor | float = 0.0
        self.cache_size = 0.0
        self.started = time.perf_counter()

    def add(self, out, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.aux += float(out.aux_loss.detach())
        self.memory_size = self.memory_size + out.memory_size.detach().cpu()
        self.cache_size += float(out.memory.sizes.float().mean())

    def flush(self, task: SequenceTask, step: int, lr: float) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        record = {
            "step": step,
            "split": "train",
            **self.metrics.result(task),
            "aux_loss": self.aux / steps,
            "memory_size": float(torch.as_tensor(self.memory_size).mean()) / steps,
            "memory_size_per_layer": (torch.as_tensor(self.memory_size) / steps).tolist(),
            "cache_size": self.cache_size / steps,
            "lr": lr,
            "tokens_per_s": self.tokens / max(seconds, 1e-9),
        }
        self.reset()
        return record

