"""End-to-end: Expire-Span learns copy across a gap several times the block length."""

from __future__ import annotations

from expire_span.training import RunConfig, Trainer, get_preset


def test_expire_span_learns_copy_with_a_fraction_of_the_memory(tmp_path):
    run = RunConfig.from_dict(get_preset("copy-test").config)
    summary = Trainer(run, tmp_path, progress=False).fit()
    task = run.build_task()
    assert task.dependency_length >= 5 * run.model["block_len"]
    assert summary["metrics"]["accuracy"] >= 0.99
    # a fixed window needs L >= the dependency; the learned spans keep far less than L
    assert summary["avg_memory_size"] < run.model["max_span"] / 2
