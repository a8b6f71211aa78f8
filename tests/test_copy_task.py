"""The copy task generator (SPEC.md section 4, our definition)."""

from __future__ import annotations

import pytest
import torch

from expire_span.tasks import CopyOptions, CopyTask, build_task
from expire_span.training import RunConfig, get_preset

K, D, A = 3, 5, 6


@pytest.fixture
def task() -> CopyTask:
    return CopyTask(CopyOptions(symbols=K, gap=D, alphabet=A, data_seed=4))


def test_episode_layout(task):
    """Symbols, D fillers, GO, the symbols again; scored where the next token is a copy."""
    batch = task.batch("train", 3, range(5), 60)
    for row in range(5):
        tokens, targets = batch.tokens[row].tolist(), batch.targets[row].tolist()
        stream = tokens + targets[-1:]
        go_positions = [i for i, t in enumerate(stream) if t == task.go]
        for go in go_positions:
            if go < K + D or go + K >= len(stream):
                continue
            symbols = stream[go - D - K : go - D]
            assert all(0 <= s < A for s in symbols)
            assert stream[go - D : go] == [task.filler] * D
            assert stream[go + 1 : go + 1 + K] == symbols
        assert go_positions, "each row of 60 tokens holds a GO"


def test_scored_positions_predict_the_symbol_k_plus_d_steps_back(task):
    batch = task.batch("valid", 2, range(4), 50)
    weights = batch.weights.bool()
    assert weights.any()
    for row, position in weights.nonzero().tolist():
        source = position + 1 - (K + D + 1)  # target is at position+1; its copy is K+D+1 back
        if source >= 0:
            assert batch.targets[row, position] == batch.tokens[row, source]
        assert batch.tokens[row, position] in ([task.go] + list(range(A)))
    # Exactly the K positions from each GO on are scored (the GO predicts s1, ..., s_{K-1}
    # predicts s_K), nothing else: found from the GO tokens of the stream, the 50 tokens before
    # the batch included (an episode cut by the batch's start is scored in its part).
    before = task.batch("valid", 1, range(4), 50)
    episodes = 0
    for row in range(4):
        stream = torch.cat([before.tokens[row], batch.tokens[row]]).tolist()
        expected = [0.0] * 50
        for go in (i for i, token in enumerate(stream) if token == task.go):
            for position in range(go - 50, go - 50 + K):
                if 0 <= position < 50:
                    expected[position] = 1.0
            if go - 50 - K - D >= 0 and go - 50 + K <= 50:  # a whole episode in the batch
                episode = batch.weights[row, go - 50 - K - D:go - 50 + K]
                assert episode.sum() == K and episode[-K:].sum() == K
                episodes += 1
        assert batch.weights[row].tolist() == expected
    assert episodes >= 4


def test_batches_are_a_continuous_stream_per_row(task):
    first, second = task.batch("train", 0, range(3), 16), task.batch("train", 1, range(3), 16)
    torch.testing.assert_close(first.targets[:, -1], second.tokens[:, 0])
    torch.testing.assert_close(first.targets[:, :-1], first.tokens[:, 1:])
    whole = task.batch("train", 0, range(3), 32)
    torch.testing.assert_close(torch.cat([first.tokens, second.tokens], 1), whole.tokens)
    torch.testing.assert_close(torch.cat([first.weights, second.weights], 1), whole.weights)


def test_batches_are_pure_functions_of_split_step_and_rows(task):
    again = CopyTask(CopyOptions(symbols=K, gap=D, alphabet=A, data_seed=4))
    torch.testing.assert_close(task.batch("train", 7, range(4), 20).tokens,
                               again.batch("train", 7, range(4), 20).tokens)
    part = task.batch("train", 7, range(2, 4), 20)
    torch.testing.assert_close(part.tokens, task.batch("train", 7, range(4), 20).tokens[2:])
    assert not torch.equal(task.batch("valid", 7, range(4), 20).tokens,
                           task.batch("train", 7, range(4), 20).tokens)
    other_seed = CopyTask(CopyOptions(symbols=K, gap=D, alphabet=A, data_seed=5))
    assert not torch.equal(other_seed.batch("train", 7, range(4), 20).tokens,
                           task.batch("train", 7, range(4), 20).tokens)


def test_queries_whose_symbols_precede_the_stream_are_not_scored(task):
    batch = task.batch("train", 0, range(8), K + D)
    assert batch.weights.sum() == 0


def test_evaluation_reads_a_warm_up_before_scoring():
    task = CopyTask(CopyOptions(symbols=K, gap=D, alphabet=A, eval_warmup=20))
    batches = list(task.eval_batches("valid", 2, 8, max_batches=3))
    assert len(batches) == task.eval_length("valid", 2, 8, 3) == 3 + 3  # ceil(20 / 8) + 3
    assert all(b.weights.sum() == 0 for b in batches[:3])
    for step, batch in enumerate(batches):
        expected = task.batch("valid", step, range(2), 8)
        torch.testing.assert_close(batch.tokens, expected.tokens)
        if step >= 3:
            torch.testing.assert_close(batch.weights, expected.weights)


def test_symbols_are_roughly_uniform():
    task = CopyTask(CopyOptions(symbols=8, gap=0, alphabet=4))
    tokens = task.batch("train", 0, range(64), 400).tokens
    symbols = tokens[tokens < 4]
    counts = torch.bincount(symbols, minlength=4).float() / symbols.numel()
    assert (counts - 0.25).abs().max() < 0.03


def test_invalid_options_and_splits():
    with pytest.raises(ValueError, match="symbols"):
        build_task("copy", {"symbols": 0})
    with pytest.raises(ValueError, match="gap"):
        build_task("copy", {"gap": -1})
    with pytest.raises(ValueError, match="unknown option"):
        build_task("copy", {"lenght": 3})
    with pytest.raises(ValueError, match="unknown task"):
        build_task("kopy")
    with pytest.raises(ValueError, match="split"):
        CopyTask().batch("dev", 0, range(1), 4)


def test_superlong_preset_needs_a_span_beyond_its_gap():
    run = RunConfig.from_dict(get_preset("copy-superlong").config).resolved()
    task = run.build_task()
    assert task.options.gap >= 16384
    assert run.model["max_span"] * run.model["init_percentage"] > task.dependency_length
