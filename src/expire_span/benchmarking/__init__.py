"""Benchmarking: training cost (time per batch, peak memory, memory size) of memory policies
against the maximum span L, on synthetic cases or a trained run. Builds on ``training`` and
``model``; nothing there imports it."""

from expire_span.benchmarking.benchmark import (
    BenchConfig,
    Case,
    batch_ms,
    case_model,
    markdown_table,
    measure,
    measure_isolated,
    primed_memory,
    ratio_lines,
    rss_mb,
    run_benchmark,
    save,
    set_retention,
)

__all__ = [
    "BenchConfig",
    "Case",
    "batch_ms",
    "case_model",
    "markdown_table",
    "measure",
    "measure_isolated",
    "primed_memory",
    "ratio_lines",
    "rss_mb",
    "run_benchmark",
    "save",
    "set_retention",
]
