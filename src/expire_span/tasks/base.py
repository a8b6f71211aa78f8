"""What a sequence task gives the trainer: batches of token streams and how to score them.

Every row of a batch is one endless stream; batch ``s`` of a split holds the tokens of steps
``[s*T, (s+1)*T)`` of every row, so the memory carried from one batch to the next is the memory of
that row's stream. A batch is a pure function of (split, step, rows), which makes resuming exact and
lets each distributed rank read its own rows.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("train", "valid", "test")


@dataclass
class Batch:
    """``tokens`` ``[B, T]`` inputs, ``targets`` ``[B, T]`` next tokens, ``weights`` ``[B, T]``
    (1 where a position counts for the loss and the metrics, 0 elsewhere).

    ``reset`` (``[B]`` bool, optional) marks the rows whose stream does not continue the previous
    batch of that row (a new document starts, or the row jumps elsewhere in the data): the trainer
    and :func:`~expire_span.training.evaluate` forget those rows' memory before reading the batch,
    so that no memory crosses a document boundary. ``None`` means every row continues.
    """

    tokens: Tensor
    targets: Tensor
    weights: Tensor
    reset: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        reset = None if self.reset is None else self.reset.to(device)
        return Batch(
            self.tokens.to(device), self.targets.to(device), self.weights.to(device), reset
        )


@dataclass
class Shard:
    """The rows of the global batch that one process reads (all of them without distribution)."""

    batch_size: int
    index: int = 0
    count: int = 1

    @property
    def rows(self) -> range:
        return range(self.index * self.batch_size, (self.index + 1) * self.batch_size)


class TextCodec(Protocol):
    """Maps text to token ids and back (characters or bytes)."""

    size: int
    unknown_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class SequenceTask(ABC):
    """A next-token task. Subclasses define ``name``, ``Options`` (a dataclass of parameters),
    ``vocab_size`` and :meth:`batch`; they may override :meth:`eval_batches` and
    :meth:`derived_metrics`."""

    name: ClassVar[str]
    Options: ClassVar[type]
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, options: Any) -> None:
        self.options = options

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def batch(self, split: str, step: int, rows: range, seq_len: int) -> Batch:
        """Batch number ``step`` of ``split`` for the given stream rows."""

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int
    ) -> Iterator[Batch]:
        """The evaluation stream of a split (here: its first ``max_batches`` batches)."""
        for step in range(max_batches):
            yield self.batch(split, step, range(batch_size), seq_len)

    def eval_length(self, split: str, batch_size: int, seq_len: int, max_batches: int) -> int:
        """Number of batches :meth:`eval_batches` yields (for progress bars)."""
        return max_batches

    def derived_metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        """Task metrics computed from the mean loss (nats) and accuracy of counted positions."""
        return {}

    def baseline_metrics(self, target_counts: np.ndarray) -> dict[str, float]:
        """Metrics of answers that need no model, from how often each target id occurs among
        the counted positions of an evaluation (weighted), so that a model's metric can be read
        against them. None by default."""
        return {}

    @classmethod
    def text_codec(cls, options: Any) -> TextCodec:
        """How text maps to token ids, built from the options alone (no data is read), so that
        generation and span analysis work from a checkpoint. Text tasks override it."""
        raise ValueError(f"task {cls.name!r} has no text form; generation and span analysis "
                         "need a text task (text, pg19, enwik8)")

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


class MetricAccumulator:
    """Sums loss, correct predictions and counted positions over batches (on the device, so
    that accumulating costs no synchronisation)."""

    def __init__(self) -> None:
        self.loss_sum: Tensor | float = 0.0
        self.correct: Tensor | float = 0.0
        self.count: Tensor | float = 0.0

    def update(self, logits: Tensor, batch: Batch) -> Tensor:
        """Add a batch; return its mean loss over counted positions (differentiable)."""
        return self.update_sum(logits, batch) / batch.weights.to(torch.float32).sum().clamp_min(1.0)

    def update_sum(self, logits: Tensor, batch: Batch) -> Tensor:
        """Add a batch; return the summed loss of its counted positions (differentiable), for a
        caller that reads a batch in parts and divides by the count of the whole."""
        weights = batch.weights.to(torch.float32)
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), batch.targets.flatten(), reduction="none"
        ).view_as(weights)
        weighted = (losses * weights).sum()
        with torch.no_grad():
            self.loss_sum = self.loss_sum + weighted.detach()
            self.correct = self.correct + ((logits.argmax(-1) == batch.targets) * weights).sum()
            self.count = self.count + weights.sum()
        return weighted

    def result(self, task: SequenceTask) -> dict[str, float]:
        count = float(self.count)
        if count == 0:
            return {"loss": math.nan, "accuracy": math.nan, "positions": 0.0}
        loss, accuracy = float(self.loss_sum) / count, float(self.correct) / count
        out = {"loss": loss, "accuracy": accuracy, "positions": count}
        out.update(task.derived_metrics(loss, accuracy))
        return out


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
