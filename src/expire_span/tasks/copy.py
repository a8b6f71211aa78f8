"""The copy task (our definition, SPEC.md section 4).

An episode is ``K`` random symbols, ``D`` filler tokens, a GO token, then the ``K``
symbols again:

    s1 s2 ... sK  F F ... F  GO s1 s2 ... sK
                  '-- D --'

The model reads it as a stream (teacher forcing): at GO it must predict s1, at the repeated s1
it must predict s2, ..., so exactly ``K`` positions are scored, each ``K + D`` steps after the
symbol it must reproduce. Only ``K`` memories matter per episode; a fixed window needs
``L >= K + D``.

Each batch row is an endless stream of independent episodes, starting at a random phase, so the
memory of earlier episodes is there to be forgotten and scored positions fall in every batch. A
query whose symbol lies before the start of the stream is not scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from expire_span.tasks.base import SPLITS, Batch, SequenceTask, check_split
from expire_span.tasks.hashing import uniform_ints

_PHASE = -1  # coordinate reserved for each row's starting phase


@dataclass
class CopyOptions:
    symbols: int = 8
    """K: symbols to copy per episode."""
    gap: int = 200
    """D: filler tokens between the symbols and GO."""
    alphabet: int = 16
    """Number of distinct symbols."""
    data_seed: int = 0
    """Seed of the generated streams (train, valid and test streams differ)."""
    eval_warmup: int = 1024
    """Evaluation reads this many tokens of each stream before scoring, so that it measures the
    steady state of an endless stream rather than its cold start (empty memory)."""

    def __post_init__(self) -> None:
        if self.symbols < 1:
            raise ValueError(f"copy: symbols (K) must be >= 1, got {self.symbols}")
        if self.gap < 0:
            raise ValueError(f"copy: gap (D) must be >= 0, got {self.gap}")
        if self.alphabet < 2:
            raise ValueError(f"copy: alphabet must be >= 2, got {self.alphabet}")
        if self.eval_warmup < 0:
            raise ValueError(f"copy: eval_warmup must be >= 0, got {self.eval_warmup}")


class CopyTask(SequenceTask):
    name = "copy"
    Options = CopyOptions
    primary_metric = "accuracy"

    options: CopyOptions

    def __init__(self, options: CopyOptions | None = None) -> None:
        super().__init__(options or CopyOptions())

    @property
    def vocab_size(self) -> int:
        return self.options.alphabet + 2

    @property
    def filler(self) -> int:
        return self.options.alphabet

    @property
    def go(self) -> int:
        return self.options.alphabet + 1

    @property
    def episode_len(self) -> int:
        return 2 * self.options.symbols + self.options.gap + 1

    @property
    def dependency_length(self) -> int:
        """Distance from every scored query to the symbol it must reproduce (K + D)."""
        return self.options.symbols + self.options.gap

    def batch(self, split: str, step: int, rows: range, seq_len: int) -> Batch:
        check_split(split)
        opts, length = self.options, self.episode_len
        k, d = opts.symbols, opts.gap
        coords = (opts.data_seed, SPLITS.index(split))
        row = np.asarray(rows, dtype=np.int64)[:, None]
        phase = uniform_ints(length, *coords, row, _PHASE)
        position = phase + step * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        episode, offset = np.divmod(position, length)
        symbol_index = np.where(offset < k, offset, offset - (k + d + 1))
        symbols = uniform_ints(opts.alphabet, *coords, row, episode, symbol_index)
        tokens = np.where(
            offset < k,
            symbols,
            np.where(offset < k + d, self.filler, np.where(offset == k + d, self.go, symbols)),
        )
        scored = (offset[:, :-1] >= k + d) & (offset[:, :-1] < 2 * k + d)
        # A query whose symbol was emitted before the stream began cannot be answered.
        scored &= position[:, :-1] - phase >= self.dependency_length
        return Batch(
            tokens=torch.from_numpy(tokens[:, :-1]),
            targets=torch.from_numpy(tokens[:, 1:]),
            weights=torch.from_numpy(scored.astype(np.float32)),
        )

    def _warmup_batches(self, seq_len: int) -> int:
        return -(-self.options.eval_warmup // seq_len)

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int
    ) -> Iterator[Batch]:
        """``eval_warmup`` tokens read without scoring, then ``max_batches`` scored batches."""
        warmup = self._warmup_batches(seq_len)
        for step in range(warmup + max_batches):
            batch = self.batch(split, step, range(batch_size), seq_len)
            if step < warmup:
                batch.weights = torch.zeros_like(batch.weights)
            yield batch

    def eval_length(self, split: str, batch_size: int, seq_len: int, max_batches: int) -> int:
        return self._warmup_batches(seq_len) + max_batches
