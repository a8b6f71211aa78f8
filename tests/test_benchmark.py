"""The benchmark harness works (its figures are not asserted: benchmarks are not tests)."""

from __future__ import annotations

import json

import pytest
import torch

from expire_span import MemoryTransformer, ModelConfig
from expire_span.benchmarking import (
    BenchConfig,
    Case,
    batch_ms,
    case_model,
    measure,
    primed_memory,
    set_retention,
)
from expire_span.cli import main


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_controlled_retention_keeps_that_fraction_of_the_span(fraction):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=2, block_len=16,
                         max_span=256, ramp=8)
    model = MemoryTransformer(config).eval()
    set_retention(model, fraction)
    tokens = torch.randint(0, 200, (4, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        memory = model(tokens).memory
    expected = fraction * config.max_span + config.ramp
    assert memory.sizes.float().mean().item() == pytest.approx(expected, rel=0.25)


def test_retention_needs_an_expire_span_model():
    model = MemoryTransformer(ModelConfig(vocab_size=10, d_model=16, n_heads=2, block_len=4,
                                          max_span=8, memory="transformer-xl"))
    with pytest.raises(ValueError, match="expire-span"):
        set_retention(model, 0.1)


def test_measure_reports_time_memory_and_memory_size():
    bench = BenchConfig(d_model=16, n_layers=1, n_heads=2, block_len=8, batch_size=2,
                        vocab_size=50, ramp=4, steps=2, warmup_steps=1, device="cpu")
    record = measure(bench, Case("xl", "transformer-xl", 32))
    assert record["ms_per_batch"] > 0 and len(record["ms_all"]) == 2
    assert record["cpu_ms_per_batch"] > 0
    assert batch_ms(record) == record["cpu_ms_per_batch"]  # CPU: compared by CPU time
    assert batch_ms({**record, "device": "cuda:0"}) == record["ms_per_batch"]
    assert record["memory_size"] == pytest.approx(32.0)
    assert record["peak_mb"] > 0


def test_bench_command_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--spans", "64", "--retentions", "0.25", "--d-model", "16",
                 "--n-layers", "1", "--n-heads", "2", "--block-len", "8", "--batch-size", "2",
                 "--vocab-size", "40", "--ramp", "4", "--steps", "1", "--warmup-steps", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    records = json.loads((out / "bench.json").read_text())["records"]
    labels = {r["label"] for r in records}
    assert labels == {"expire-span r=0.25", "transformer-xl matched r=0.25", "transformer-xl"}
    assert all("ms_per_batch" in r for r in records), records
    assert (out / "bench.png").stat().st_size > 0
    assert "time vs XL" in capsys.readouterr().out


STEADY_CASES = [
    Case("transformer-xl", "transformer-xl", 64),
    Case("adaptive-span", "adaptive-span", 64),
    Case("compressive", "compressive", 64),
    Case("expire-span r=1", "expire-span", 64, retention=1.0),
    Case("expire-span r=0", "expire-span", 64, retention=0.0),
]


@pytest.mark.parametrize("case", STEADY_CASES, ids=[case.label for case in STEADY_CASES])
def test_priming_gives_every_policy_the_memory_of_a_model_that_read_the_whole_past(case):
    """The memory a case is timed from keeps the steps (and, for Compressive, the compressed
    slots) that reading the past block by block from an empty memory keeps."""
    bench = BenchConfig(d_model=16, n_layers=2, n_heads=2, block_len=8, batch_size=2,
                        vocab_size=50, ramp=4, device="cpu")
    model = case_model(bench, case).eval()
    primed = primed_memory(model, bench.batch_size, torch.Generator().manual_seed(1))
    tokens = torch.randint(0, bench.vocab_size, (bench.batch_size, primed.next_step),
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        streamed = model(tokens).memory
    assert primed.next_step == streamed.next_step

    def kept_steps(layer):
        return [row[valid].tolist() for row, valid in zip(layer.steps, layer.valid, strict=True)]

    for ours, reference in zip(primed.layers, streamed.layers, strict=True):
        assert kept_steps(ours) == kept_steps(reference)
        if case.memory == "compressive":
            assert kept_steps(ours.compressed) == kept_steps(reference.compressed)
            assert ours.compressed.counts().min() == model.layers[0].policy.cmem_len
