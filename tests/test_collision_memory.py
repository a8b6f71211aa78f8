"""benchmarks/collision_memory.py: a trained model's Object Collision error by answer distance."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from expire_span.tasks import build_task
from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def collision_memory():
    with benchmark_script("collision_memory") as module:
        yield module


class Echo:
    """A stand-in model whose answer at every position is the token read there."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, tokens, memory):
        return SimpleNamespace(logits=F.one_hot(tokens, self.vocab).float(), memory=memory)


class Clock:
    """A stand-in model that answers with its position in the stream (mod the vocabulary),
    counted in its memory: right only if the memory is carried from call to call and reset at
    each simulation."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, tokens, memory):
        start = 0 if memory is None else memory
        positions = torch.arange(start, start + tokens.shape[1]).unsqueeze(0) % self.vocab
        return SimpleNamespace(logits=F.one_hot(positions, self.vocab).float(),
                               memory=start + tokens.shape[1])


BOARD = {"train_frames": 300, "valid_frames": 500, "test_frames": 300,
         "simulation_frames": 200, "grid": 4, "colours": 2}


def labelled_frames(task):
    """Per valid simulation: its tokens ``[frames, width]`` and its labelled frames' indices."""
    documents, width = task.documents("valid"), task.options.frame_tokens
    for sim, frames in enumerate(task.simulation_lengths("valid")):
        start = sim * documents.frames_per_row
        tokens = np.asarray(documents.tokens[start * width:(start + frames) * width])
        labels = np.asarray(documents.labels[start:start + frames])
        yield tokens.reshape(frames, width), np.flatnonzero(labels > 0)


@pytest.mark.parametrize("chunk", [4096, 13])
def test_each_simulation_is_one_stream_from_an_empty_memory(collision_memory, chunk):
    task = build_task("object-collision", BOARD)
    answers = collision_memory.model_answers(Clock(task.vocab_size), task, "valid", chunk=chunk)
    width = task.options.frame_tokens
    expected = [(f * width + width - 1) % task.vocab_size
                for _, labelled in labelled_frames(task) for f in labelled]
    assert len(expected) > 20
    assert answers.tolist() == expected


@pytest.mark.parametrize("chunk", [4096, 13])
def test_answers_are_read_at_each_labelled_frames_last_token(collision_memory, chunk):
    task = build_task("object-collision", BOARD)
    answers = collision_memory.model_answers(Echo(task.vocab_size), task, "valid", chunk=chunk)
    expected = [tokens[f, -1] for tokens, labelled in labelled_frames(task) for f in labelled]
    assert len(expected) == len(collision_memory.answer_distances(task, "valid")["label"]) > 20
    assert answers.tolist() == expected


def test_errors_by_distance_by_hand(collision_memory):
    label = np.array([1, 1, 2, 3, 1, 4])
    distance = np.array([10, 64, 65, 300, 2000, 50])
    answer = np.array([1, 2, 2, 1, 1, 4])
    rows = collision_memory.errors_by_distance(label, distance, answer, [64, 256])
    assert [(r["from"], r["to"]) for r in rows] == [(0, 64), (64, 256), (256, None)]
    # (0, 64]: distances 10, 64, 50 -> answers right, wrong, right; the constant (1) is right,
    # right, wrong
    assert rows[0]["share"] == pytest.approx(3 / 6)
    assert rows[0]["error"] == pytest.approx(1 / 3)
    assert rows[0]["constant_error"] == pytest.approx(1 / 3)
    assert rows[1]["error"] == 0.0 and rows[1]["constant_error"] == 1.0  # distance 65, label 2
    assert rows[2]["error"] == pytest.approx(1 / 2)  # 300 (wrong), 2000 (right)
    assert rows[2]["constant_error"] == pytest.approx(1 / 2)


def test_an_empty_bin_has_no_error(collision_memory):
    rows = collision_memory.errors_by_distance(np.array([1, 2]), np.array([5, 6]),
                                               np.array([1, 2]), [64, 256])
    assert rows[1]["share"] == 0 and rows[1]["error"] is None


def test_a_real_model_on_its_own_board(collision_memory, tmp_path):
    """End to end on a tiny trained run: one record per split, bins summing to every answer."""
    from expire_span.training import RunConfig, Trainer

    run = RunConfig.from_dict({
        "task": "object-collision",
        "task_options": {"train_frames": 400, "valid_frames": 300, "test_frames": 300,
                         "simulation_frames": 150, "grid": 4, "colours": 1,
                         "cache_dir": str(tmp_path / "cache")},
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "block_len": 16, "max_span": 64,
                  "memory": "expire-span"},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "eval_every": 2,
                  "eval_batches": 1, "log_every": 1, "checkpoint_every": 2},
    })
    Trainer(run, tmp_path / "run", progress=False).fit()
    records = collision_memory.evaluate_checkpoints([str(tmp_path / "run")], ["test"], [64])
    (record,) = records
    assert record["max_span"] == 64 and record["model"] == "expire-span"
    assert sum(r["share"] for r in record["bins"]) == pytest.approx(1.0)
    assert record["error"] == pytest.approx(
        sum(r["share"] * r["error"] for r in record["bins"] if r["error"] is not None))


def test_span_quantiles_read_the_first_simulation_and_summarise_each_layer(collision_memory,
                                                                         monkeypatch):
    """The spans are taken over the split's first whole frames (``tokens // width`` of them), and
    each layer gets its own median and 90th percentile: with
    layer spans 0..n-1 and 100..100+n-1, hand-computed values."""
    task = build_task("object-collision", BOARD)
    width = task.options.frame_tokens
    seen = []

    def fake_spans(model, tokens):
        seen.append(tokens)
        n = tokens.numel()
        return torch.stack([torch.arange(n, dtype=torch.float32),
                            100 + torch.arange(n, dtype=torch.float32)])

    monkeypatch.setattr(collision_memory, "token_spans", fake_spans)
    quantiles = collision_memory.span_quantiles(None, task, "valid", tokens=10 * width + 3)
    first = np.asarray(task.documents("valid").tokens[:10 * width]).astype(np.int64)
    assert seen[0].tolist() == first.tolist()
    n = 10 * width  # 80 tokens: median (lower middle) 39, 90th percentile 0.9 * 79 = 71.1
    assert n == 80
    assert quantiles == [{"layer": 0, "median": 39.0, "p90": pytest.approx(71.1)},
                         {"layer": 1, "median": 139.0, "p90": pytest.approx(171.1)}]
