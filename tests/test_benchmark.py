"""The benchmark harness works (its figures are not asserted: benchmarks are not tests)."""

from __future__ import annotations

import json

import pytest
import torch

from expire_span import MemoryTransformer, ModelConfig
from expire_span.benchmarking import BenchConfig, Case, batch_ms, measure, set_retention
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
