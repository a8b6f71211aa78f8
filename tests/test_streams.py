"""How data tasks lay documents out over batch rows, checked on documents whose tokens are their
own global indices (so every input reveals exactly where it came from)."""

from __future__ import annotations

import numpy as np
import pytest

from expire_span.tasks.streams import NextTokenDocuments, StreamOptions, StreamTask

# tokens per document (a document of n tokens has n - 1 scored positions)
LENGTHS = {"train": [9, 1, 30, 2, 17, 5], "valid": [12, 25, 3, 8, 1, 14], "test": [40]}


class IndexTask(StreamTask):
    name = "index"
    Options = StreamOptions

    def __init__(self, **options) -> None:
        super().__init__(StreamOptions(**options))

    @property
    def vocab_size(self) -> int:
        return 1000

    def load_documents(self, split):
        bounds = np.concatenate([[0], np.cumsum(LENGTHS[split])])
        return NextTokenDocuments(np.arange(bounds[-1]), bounds)


def doc_starts(split):
    return set(np.concatenate([[0], np.cumsum(LENGTHS[split])[:-1]]).tolist())


def scored_targets(split, limit=None):
    """Every token but the first of each document, in file order."""
    bounds = np.concatenate([[0], np.cumsum(LENGTHS[split])])
    out = [t for a, b in zip(bounds[:-1], bounds[1:], strict=True) for t in range(a + 1, b)]
    return out[:limit]


def check_rows_stay_in_one_document(batch):
    weights = batch.weights.bool()
    for row in range(len(weights)):
        count = int(weights[row].sum())
        assert weights[row, :count].all() and not weights[row, count:].any()  # padding last
        inputs, targets = batch.tokens[row, :count], batch.targets[row, :count]
        assert (targets == inputs + 1).all()  # next token, inside one document


@pytest.mark.parametrize("rows, seq_len", [(1, 4), (3, 7), (5, 4), (16, 3)])
def test_evaluation_reads_every_position_once_in_contiguous_slices(rows, seq_len):
    task = IndexTask()
    batches = list(task.eval_batches("valid", rows, seq_len, max_batches=1))
    assert len(batches) == task.eval_length("valid", rows, seq_len, 1)
    per_row: list[list[int]] = [[] for _ in range(rows)]
    previous_last = [None] * rows
    for batch in batches:
        check_rows_stay_in_one_document(batch)
        for row in range(rows):
            scored = batch.targets[row][batch.weights[row].bool()].tolist()
            first_input = int(batch.tokens[row, 0])
            if scored and first_input in doc_starts("valid"):
                assert batch.reset[row]  # a new document: memory must be forgotten
            if scored and not batch.reset[row]:  # continues the same document exactly
                assert previous_last[row] is not None and first_input == previous_last[row] + 1
            per_row[row] += scored
            previous_last[row] = int(batch.tokens[row, -1]) if len(scored) == seq_len else None
    flat = [t for row in per_row for t in row]
    assert flat == scored_targets("valid")  # rows are consecutive slices, in file order
    sizes = [len(r) for r in per_row]
    assert max(sizes) - min(sizes) <= 1


def test_evaluation_can_be_capped_to_the_first_positions():
    task = IndexTask(eval_tokens=20)
    scored = [t for b in task.eval_batches("valid", 3, 4, 1)
              for t in b.targets[b.weights.bool()].tolist()]
    assert sorted(scored) == scored_targets("valid", 20)


def test_max_batches_does_not_cut_the_evaluation_short():
    task = IndexTask()
    assert task.eval_length("test", 2, 4, max_batches=1) == -(-(39 // 2 + 1) // 4)


def test_training_rows_are_document_streams_with_resets():
    task = IndexTask(data_seed=3)
    seq_len, rows = 4, 6
    padded_total = sum(-(-(n - 1) // seq_len) * seq_len for n in LENGTHS["train"] if n > 1)
    epoch_steps = padded_total // seq_len
    seen = [set() for _ in range(rows)]
    previous_last = [None] * rows
    for step in range(2 * epoch_steps + 3):
        batch = task.batch("train", step, range(rows), seq_len)
        check_rows_stay_in_one_document(batch)
        for row in range(rows):
            first = int(batch.tokens[row, 0])
            count = int(batch.weights[row].sum())
            starts_document = first in doc_starts("train")
            assert bool(batch.reset[row]) == (starts_document or step % epoch_steps == 0)
            if not batch.reset[row]:
                assert previous_last[row] is not None and first == previous_last[row] + 1
            previous_last[row] = int(batch.tokens[row, -1]) if count == seq_len else None
            if step < epoch_steps:
                seen[row].update(batch.targets[row][batch.weights[row].bool()].tolist())
    for row in range(rows):  # in one epoch, each row reads every document once
        assert sorted(seen[row]) == scored_targets("train")


def test_training_batches_are_pure_functions_of_split_step_and_rows():
    task = IndexTask(data_seed=1)
    whole = task.batch("train", 11, range(6), 5)
    part = IndexTask(data_seed=1).batch("train", 11, range(2, 5), 5)
    for name in ("tokens", "targets", "weights", "reset"):
        assert (getattr(part, name) == getattr(whole, name)[2:5]).all()
    other = IndexTask(data_seed=2).batch("train", 11, range(6), 5)
    assert not (other.tokens == whole.tokens).all()


def test_a_split_without_positions_is_refused():
    class Empty(IndexTask):
        def load_documents(self, split):
            return NextTokenDocuments(np.arange(3), np.array([0, 1, 2, 3]))

    with pytest.raises(ValueError, match="no position to predict"):
        Empty().batch("train", 0, range(1), 4)
