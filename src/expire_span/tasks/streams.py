"""Data tasks read as streams of documents: how a split is laid out over the rows of a batch.

A split is a list of *documents* (a book, a file, a slice of enwik8, one simulation of object
collision). A document has a number of *positions*, each an (input token, target, weight)
triple. Memory must never cross from one document into another, and the model forgets a row's
memory only between batches, so every document is padded to a multiple of the batch length
``T`` (padding positions have weight 0) and a batch row always lies inside one document.

Training (:meth:`StreamTask.batch`): every row is an endless stream. In epoch ``e`` the documents
are read in a random order (a permutation drawn from ``(data_seed, split, e)``), as one cyclic
concatenation, starting at a random multiple of ``T`` drawn per (row, epoch); an epoch of a row is
one full turn around the concatenation. The batch is a pure function of (split, step, rows), so
resuming is exact and distributed ranks can read disjoint rows. ``Batch.reset`` marks rows that
start a document or begin a new epoch.

Evaluation (:meth:`StreamTask.eval_batches`): the split's positions, in file order, are cut into
``batch_size`` contiguous slices of (nearly) equal size; row ``r`` reads slice ``r`` as one stream,
with memory carried across blocks and forgotten where a new document starts. Every position of the
split is read exactly once (or the first ``eval_tokens`` of them). Rows that finish early read
padding until the longest row is done.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from expire_span.tasks.base import SPLITS, Batch, SequenceTask, check_split
from expire_span.tasks.hashing import uniform_ints

_OFFSET = -2  # hash coordinate reserved for the rows' starting offsets


class Documents(ABC):
    """The documents of one split. Subclasses provide ``lengths`` and :meth:`windows`."""

    lengths: np.ndarray
    """int64 ``[n_documents]``: positions per document."""

    @abstractmethod
    def windows(
        self, docs: np.ndarray, offsets: np.ndarray, counts: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, targets (int64) and weights (float32), each ``[R, width]``: row ``r`` holds
        positions ``offsets[r] .. offsets[r] + counts[r] - 1`` of document ``docs[r]``, then
        padding (token 0, target 0, weight 0)."""


class NextTokenDocuments(Documents):
    """Documents of a token array for next-token prediction: document ``k`` is
    ``tokens[bounds[k]:bounds[k + 1]]``; its first token is context only, every later token is a
    scored target (so a document of ``n`` tokens has ``n - 1`` positions)."""

    def __init__(self, tokens: np.ndarray, bounds: np.ndarray) -> None:
        self.tokens = tokens
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.lengths = np.maximum(np.diff(self.bounds) - 1, 0)

    def windows(self, docs, offsets, counts, width):
        steps = np.arange(width, dtype=np.int64)[None, :]
        valid = steps < counts[:, None]
        index = np.where(valid, self.bounds[docs][:, None] + offsets[:, None] + steps, 0)
        inputs = np.where(valid, self.tokens[index], 0).astype(np.int64)
        targets = np.where(valid, self.tokens[np.where(valid, index + 1, 0)], 0).astype(np.int64)
        return inputs, targets, valid.astype(np.float32)


@dataclass
class StreamOptions:
    """Options every data task has (data task options dataclasses inherit them)."""

    data_seed: int = 0
    """Seed of the training order (and of generated data)."""
    eval_tokens: int | None = None
    """Evaluate on only the first N positions of the split (None: the whole split, which is
    what the reported metric means; a cap is for quick checks on CPU)."""
    cache_dir: str = ""
    """Where decoded or generated data is cached (empty: $XDG_CACHE_HOME/expire-span or
    ~/.cache/expire-span)."""

    def __post_init__(self) -> None:
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"eval_tokens must be >= 1 or None, got {self.eval_tokens}")


class StreamTask(SequenceTask):
    """A task whose splits are :class:`Documents`; subclasses implement :meth:`load_documents`."""

    options: StreamOptions

    def __init__(self, options: StreamOptions) -> None:
        super().__init__(options)
        self._documents: dict[str, Documents] = {}
        self._epochs: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray, int]] = {}
        self._eval_layouts: dict[tuple[str, int, int], _EvalLayout] = {}

    @abstractmethod
    def load_documents(self, split: str) -> Documents:
        """Read (or generate) a split; called once per split and cached."""

    def documents(self, split: str) -> Documents:
        check_split(split)
        if split not in self._documents:
            documents = self.load_documents(split)
            if int(documents.lengths.sum()) == 0:
                raise ValueError(f"{self.name}: the {split} split holds no position to predict")
            self._documents[split] = documents
        return self._documents[split]

    # ------------------------------------------------------------------ training

    def _epoch(self, split: str, epoch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(document order, padded start of each in the cyclic concatenation, total length)."""
        key = (split, epoch, seq_len)
        if key not in self._epochs:
            lengths = self.documents(split).lengths
            nonempty = np.flatnonzero(lengths > 0)
            rng = np.random.default_rng([self.options.data_seed, SPLITS.index(split), epoch])
            order = nonempty[rng.permutation(len(nonempty))]
            padded = -(-lengths[order] // seq_len) * seq_len
            starts = np.concatenate([[0], np.cumsum(padded)[:-1]])
            if len(self._epochs) >= 4:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = (order, starts, int(padded.sum()))
        return self._epochs[key]

    def batch(self, split: str, step: int, rows: range, seq_len: int) -> Batch:
        """Training batch ``step``: see the module docstring for the layout."""
        documents = self.documents(split)
        total = self._epoch(split, 0, seq_len)[2]
        epoch, within = divmod(step * seq_len, total)
        order, starts, _ = self._epoch(split, epoch, seq_len)
        row = np.asarray(rows, dtype=np.int64)
        chunk = uniform_ints(total // seq_len, self.options.data_seed, SPLITS.index(split), row,
                             epoch, _OFFSET)
        position = (chunk * seq_len + within) % total
        index = np.searchsorted(starts, position, side="right") - 1
        docs = order[index]
        offsets = position - starts[index]
        counts = np.clip(documents.lengths[docs] - offsets, 0, seq_len)
        reset = (offsets == 0) | (within == 0)
        return _to_batch(documents.windows(docs, offsets, counts, seq_len), reset)

    # ------------------------------------------------------------------ evaluation

    def _eval_layout(self, split: str, batch_size: int, seq_len: int) -> _EvalLayout:
        key = (split, batch_size, seq_len)
        if key not in self._eval_layouts:
            lengths = self.documents(split).lengths
            limit = self.options.eval_tokens
            self._eval_layouts[key] = _EvalLayout.build(lengths, batch_size, seq_len, limit)
        return self._eval_layouts[key]

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int
    ) -> Iterator[Batch]:
        """The whole split (``max_batches`` is ignored), as ``batch_size`` contiguous slices."""
        layout = self._eval_layout(split, batch_size, seq_len)
        documents = self.documents(split)
        for step in range(layout.steps):
            docs, offsets, counts, reset = layout.at(step * seq_len, seq_len)
            yield _to_batch(documents.windows(docs, offsets, counts, seq_len), reset)

    def eval_length(self, split: str, batch_size: int, seq_len: int, max_batches: int) -> int:
        return self._eval_layout(split, batch_size, seq_len).steps


class LanguageModelTask(StreamTask):
    """Next-token prediction on text. Its metric is bits per character (``bpc``) or per byte
    (``bpb``): the mean loss in nats over every scored position of the split, divided by ln 2."""

    primary_metric = "bpc"
    higher_is_better = False

    def derived_metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        return {self.primary_metric: loss / math.log(2)}


def _to_batch(window: tuple[np.ndarray, np.ndarray, np.ndarray], reset: np.ndarray) -> Batch:
    inputs, targets, weights = window
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(weights),
                 torch.from_numpy(np.ascontiguousarray(reset, dtype=bool)))


@dataclass
class _EvalLayout:
    """Pieces of documents assigned to evaluation rows, each piece padded to a multiple of T.

    Row ``r``'s padded stream occupies ``[row_start[r], row_start[r] + row_length[r])`` of one
    global coordinate; ``piece_start`` (sorted) places each piece in that coordinate.
    """

    piece_start: np.ndarray
    piece_doc: np.ndarray
    piece_offset: np.ndarray
    piece_count: np.ndarray
    row_start: np.ndarray
    row_length: np.ndarray
    steps: int

    @classmethod
    def build(cls, lengths: np.ndarray, rows: int, seq_len: int, limit: int | None) -> _EvalLayout:
        cumulative = np.concatenate([[0], np.cumsum(lengths)])
        total = int(cumulative[-1]) if limit is None else min(int(cumulative[-1]), limit)
        bounds = [total * r // rows for r in range(rows + 1)]
        start, doc, offset, count, row_start, row_length = [], [], [], [], [], []
        cursor = 0
        for r in range(rows):
            row_start.append(cursor)
            low, high = bounds[r], bounds[r + 1]
            k = int(np.searchsorted(cumulative, low, side="right")) - 1
            while low < high:
                piece = min(high, int(cumulative[k + 1])) - low
                if piece > 0:
                    start.append(cursor)
                    doc.append(k)
                    offset.append(low - int(cumulative[k]))
                    count.append(piece)
                    cursor += -(-piece // seq_len) * seq_len
                low += piece
                k += 1
            row_length.append(cursor - row_start[-1])
        arrays = [np.asarray(v, dtype=np.int64)
                  for v in (start, doc, offset, count, row_start, row_length)]
        return cls(*arrays, steps=int(max(row_length, default=0)) // seq_len)

    def at(self, position: int, width: int):
        """(docs, offsets, counts, reset) of every row for the batch at ``position``."""
        inside = position < self.row_length
        where = self.row_start + np.minimum(position, np.maximum(self.row_length - 1, 0))
        index = np.maximum(np.searchsorted(self.piece_start, where, side="right") - 1, 0)
        within = where - self.piece_start[index]
        counts = np.where(inside, np.clip(self.piece_count[index] - within, 0, width), 0)
        return (self.piece_doc[index], self.piece_offset[index] + within, counts,
                inside & (within == 0))
