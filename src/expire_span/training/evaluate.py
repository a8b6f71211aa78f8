"""Evaluation: read a split as streams with memory carried across batches."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from expire_span.memory import Memory
from expire_span.model import MemoryTransformer
from expire_span.tasks import Batch, MetricAccumulator, SequenceTask


def forget_restarted_rows(memory: Memory | None, batch: Batch) -> Memory | None:
    """``memory`` with the rows that ``batch.reset`` starts afresh forgotten, so that no memory
    crosses a document boundary (the trainer and :func:`evaluate` call this before each batch)."""
    if memory is None or batch.reset is None or not bool(batch.reset.any()):
        return memory
    return memory.reset(batch.reset)


@torch.no_grad()
def evaluate(
    model: MemoryTransformer,
    task: SequenceTask,
    split: str,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    progress: bool = False,
) -> dict[str, float]:
    """Task metrics on ``split`` (and the task's baseline metrics on the same positions), plus the
    average memory size and cache size (over the batches that are scored).

    The model is put in eval mode (and restored afterwards); memory starts empty and is carried
    from batch to batch, the way the paper evaluates, except for rows the task marks as starting
    a new document (``Batch.reset``).
    """
    was_training = model.training
    model.eval()
    accumulator = MetricAccumulator()
    target_counts = torch.zeros(task.vocab_size, dtype=torch.float64, device=model.device)
    memory, batches, memory_size, cache_size = None, 0, 0.0, 0.0
    total = task.eval_length(split, batch_size, seq_len, max_batches)
    bar = tqdm(total=total, desc=f"eval {split}", disable=not progress, leave=False)
    try:
        for batch in task.eval_batches(split, batch_size, seq_len, max_batches):
            batch = batch.to(model.device)
            out = model(batch.tokens, forget_restarted_rows(memory, batch))
            memory = out.memory
            accumulator.update(out.logits, batch)
            target_counts += torch.bincount(batch.targets.flatten(), minlength=task.vocab_size,
                                            weights=batch.weights.flatten().double())
            if bool(batch.weights.any()):  # warm-up batches are read but not measured
                memory_size += float(out.memory_size.mean())
                cache_size += float(memory.sizes.float().mean())
                batches += 1
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    metrics = accumulator.result(task)
    metrics.update(task.baseline_metrics(target_counts.cpu().numpy()))
    metrics["memory_size"] = memory_size / max(batches, 1)
    metrics["cache_size"] = cache_size / max(batches, 1)
    return metrics
