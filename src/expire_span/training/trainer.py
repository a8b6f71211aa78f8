"""The training loop for sequence tasks: token streams read in batches, memory carried across.

It knows nothing about memory policies: it adds ``out.aux_loss`` to the task loss (weighted by
:class:`~expire_span.training.aux_gate.AuxiliaryGate`: held at 0 until the task is being
learned), reports
``out.memory_size`` and calls ``model.after_optimizer_step()``. What all trainers share (resume,
checkpoints, logging, signals, divergence checks) is in :mod:`expire_span.training.loop`.

Several processes and micro-batches. ``train.batch_size`` is the global batch. Under torchrun,
process r of N reads rows ``[r B/N, (r+1) B/N)`` and its network is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`; with ``train.accumulate = A`` it reads them in
A micro-batches of B/(N A) rows, micro-batch i always the same rows, each with its own memory.
Every part scales its loss so that the gradients, summed over micro-batches and averaged over
processes, are those of one pass over the global batch:

- task loss: the summed loss of the part's scored positions over the scored positions of the
  whole global batch (counted before the forward passes, one all-reduce per step);
- ``aux_loss``: every policy's is a mean over the rows of the batch it is given (or does not
  depend on the batch), so the part's is weighted by its share of the rows;
- both times N, as DistributedDataParallel averages over the processes.

Each micro-batch starts from the step's random state, so it draws the same random numbers (e.g.
Expire-Span's span noise) as one pass over the global batch; every process starts from the same
seed. With dropout, each part then reuses the masks of the first rows: the runs differ from one
pass over the global batch, but are still valid training.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from expire_span.memory import Memory
from expire_span.model import MemoryTransformer
from expire_span.tasks import MetricAccumulator, SequenceTask, Shard
from expire_span.training.distributed import Group
from expire_span.training.evaluate import evaluate, forget_restarted_rows
from expire_span.training.loop import TrainingLoop


class Trainer(TrainingLoop):
    """Trains a :class:`MemoryTransformer` on a :class:`SequenceTask` into ``out_dir``;
    arguments as :class:`~expire_span.training.loop.TrainingLoop`."""

    task: SequenceTask
    model: MemoryTransformer

    def _setup(self) -> None:
        cfg, world = self.train_cfg, self.group.world_size
        if cfg.batch_size % (world * cfg.accumulate):
            raise ValueError(
                f"train.batch_size ({cfg.batch_size}) must be divisible by the number of "
                f"processes ({world}) times train.accumulate ({cfg.accumulate})"
            )
        self.rows = cfg.batch_size // world
        self.shard = Shard(self.rows, self.group.rank, world)
        size, first = self.rows // cfg.accumulate, self.shard.rows.start
        self.micro_rows = [range(first + i * size, first + (i + 1) * size)
                           for i in range(cfg.accumulate)]
        """The global rows of each micro-batch of this process."""
        self.memories: list[Memory | None] = [None] * cfg.accumulate
        self.network: torch.nn.Module = self.model
        if self.group.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            skips = any(layer.policy.skips_parameters for layer in self.model.layers)
            self.network = DistributedDataParallel(self.model, device_ids=device_ids,
                                                   find_unused_parameters=skips)
        self.interval = _Interval(self.device)

    def _local_memory(self) -> Memory | None:
        if any(memory is None for memory in self.memories):
            return None
        return Memory.concat(self.memories)

    def _restore_memory(self, memory: Memory) -> None:
        if memory.batch_size != self.train_cfg.batch_size:
            raise ValueError(
                f"the checkpoint holds the memory of {memory.batch_size} rows, but "
                f"train.batch_size is {self.train_cfg.batch_size}"
            )
        self.memories = [memory.rows(slice(rows.start, rows.stop)) for rows in self.micro_rows]

    def evaluate(self, split: str = "valid", progress: bool = False) -> dict[str, float]:
        return evaluate(
            self.model, self.task, split, self.run.eval_batch_size, self.run.seq_len,
            self.train_cfg.eval_batches, progress=progress,
        )

    def _train_step(self, step: int) -> None:
        batches = [self.task.batch("train", step, rows, self.run.seq_len).to(self.device)
                   for rows in self.micro_rows]
        local = torch.stack([batch.weights.to(torch.float32).sum() for batch in batches]).sum()
        scored_total = self.group.sum(local)
        scored = scored_total.clamp_min(1.0)
        processes = self.group.world_size
        aux_weight = self.aux_gate.apply(self.model, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.network.train()
        random_state = _random_state(self.device)
        losses, task_losses = [], []
        for index, (rows, batch) in enumerate(zip(self.micro_rows, batches, strict=True)):
            if index:
                _set_random_state(random_state, self.device)
            share = len(rows) / self.train_cfg.batch_size
            with self._gradient_sync(index == len(batches) - 1):
                with self.autocast():
                    out = self.network(batch.tokens,
                                       forget_restarted_rows(self.memories[index], batch))
                task_loss = self.interval.metrics.update_sum(out.logits, batch) / scored
                loss = (task_loss + out.aux_loss * (share * aux_weight)) * processes
                self._backward(loss)
            losses.append(loss.detach())
            task_losses.append(task_loss.detach())
            self.memories[index] = out.memory
            self.interval.add(out, share, batch.tokens.numel())
        self._optimizer_step(step, losses)
        self.interval.steps += 1
        self._observe_loss(step, task_losses, scored_total)

    def _observe_loss(self, step: int, task_losses: list[torch.Tensor],
                      scored: torch.Tensor) -> None:
        """Hand the gate the global training loss of the step (one all-reduce, while held)."""
        if self.aux_gate.opened_at is not None:
            return
        loss = self.group.sum(torch.stack(task_losses).sum())
        self.aux_gate.observe(step, float(loss) if float(scored) > 0 else None)

    def _gradient_sync(self, last: bool) -> AbstractContextManager[Any]:
        """DistributedDataParallel averages gradients after the last micro-batch only."""
        if last or not isinstance(self.network, DistributedDataParallel):
            return nullcontext()
        return self.network.no_sync()

    def _log_record(self, step: int) -> dict[str, Any]:
        record = self.interval.flush(self.task, step, self.scheduler.get_last_lr()[0], self.group)
        record["aux_weight"] = self.aux_gate.scale(step - 1)  # of the last step taken
        return record

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{record['loss']:.3f}"}
        if not math.isnan(record.get("accuracy", math.nan)):
            postfix["acc"] = f"{record['accuracy']:.3f}"
        postfix["mem"] = f"{record['memory_size']:.0f}/{self.model.config.max_span}"
        return postfix


def _random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_random_state(state: tuple[torch.Tensor, torch.Tensor | None],
                      device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Interval:
    """Training statistics since the last log line, of this process's rows; :meth:`flush` sums
    them over the processes. Per-row averages (auxiliary loss, memory and cache sizes) are added
    weighted by each part's share of the global batch, so their sum is the global average."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.metrics = MetricAccumulator()
        self.steps = 0
        self.tokens = 0
        self.aux = torch.zeros((), device=self.device)
        self.memory_size: torch.Tensor | float = 0.0
        self.cache_size = torch.zeros((), device=self.device)
        self.started = time.perf_counter()

    def add(self, out, share: float, tokens: int) -> None:
        self.tokens += tokens
        self.aux = self.aux + out.aux_loss.detach().float() * share
        self.memory_size = self.memory_size + out.memory_size.detach().float() * share
        self.cache_size = self.cache_size + out.memory.sizes.float().mean() * share

    def flush(self, task: SequenceTask, step: int, lr: float, group: Group) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        metrics = self.metrics
        local = torch.cat([
            torch.stack([torch.as_tensor(value, dtype=torch.float64, device=self.device)
                         for value in (metrics.loss_sum, metrics.correct, metrics.count,
                                       self.aux, self.cache_size, self.tokens)]),
            torch.as_tensor(self.memory_size, dtype=torch.float64, device=self.device).flatten(),
        ])
        total = group.sum(local).cpu()
        summed = MetricAccumulator()
        summed.loss_sum, summed.correct, summed.count = total[:3].tolist()
        aux, cache_size, tokens = total[3:6].tolist()
        memory_size = total[6:] / steps
        record = {
            "step": step,
            "split": "train",
            **summed.result(task),
            "aux_loss": aux / steps,
            "memory_size": float(memory_size.mean()),
            "memory_size_per_layer": memory_size.tolist(),
            "cache_size": cache_size / steps,
            "lr": lr,
            "tokens_per_s": tokens / max(seconds, 1e-9),
        }
        self.reset()
        return record
