"""Training cost of memory policies: time per batch, peak memory and memory size against L.

Each case runs in a fresh process so that peak memory is its own. A case builds a model, fills its
memory with the states of a long past (embeddings of random tokens at consecutive steps: ``L + R``
of them, or for Compressive a FIFO of ``n_m`` and ``n_cm`` compressed slots) and lets the policy
process one priming block, so it starts from its steady state without reading ``L`` tokens block
by block (``primed_memory``). Then ``warmup_steps`` + ``steps`` training steps (forward,
backward, optimizer step, memory carried) are timed; the median is reported. Peak memory is
measured over the timed steps only: on CPU the process's resident-set high-water mark, reset
after priming through ``/proc/self/clear_refs``; on GPU the allocator's peak.

Expire-Span is measured at *controlled retention* r: the embedding of a random r-fraction of the
vocabulary carries a large positive value in channel 0 (the others a negative one) and every
layer's span predictor reads that channel with a large weight, so those tokens live L steps and
the rest expire at once (``set_retention``). Tokens are uniform, so about ``r L + R`` memories
survive; the measured average memory size is reported next to every figure.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import multiprocessing
import queue
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from expire_span.config import ModelConfig
from expire_span.memory import LayerMemory, Memory
from expire_span.model import MemoryTransformer
from expire_span.policies.base import MemoryPolicy
from expire_span.policies.compressive import CompressivePolicy
from expire_span.policies.expire_span import ExpireSpanPolicy


@dataclass
class BenchConfig:
    """The fixed model and batch every case is measured with."""

    policies: list[str] = field(default_factory=lambda: ["expire-span", "transformer-xl"])
    spans: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    retentions: list[float] = field(default_factory=lambda: [0.05, 0.25])
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    block_len: int = 64
    batch_size: int = 4
    vocab_size: int = 256
    ramp: int = 32
    attention: str = "auto"
    steps: int = 5
    warmup_steps: int = 2
    device: str = "auto"
    seed: int = 0
    max_memory_gb: float = 12.0
    """Cases whose estimated peak exceeds this are skipped (not run)."""
    timeout_s: float = 1800.0


@dataclass
class Case:
    label: str
    memory: str
    max_span: int
    retention: float | None = None


def set_retention(model: MemoryTransformer, fraction: float, seed: int = 0) -> None:
    """Make a random ``fraction`` of the vocabulary live ``L`` steps and the rest expire at once."""
    vocab = model.config.vocab_size
    keep = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    keep = keep[: round(fraction * vocab)]
    with torch.no_grad():
        sign = -torch.ones(vocab, device=model.device)
        sign[keep.to(model.device)] = 1.0
        model.embedding.weight[:, 0] = 3.0 * sign
        for layer in model.layers:
            if not isinstance(layer.policy, ExpireSpanPolicy):
                raise ValueError("controlled retention needs an expire-span model")
            predictor = layer.policy.span_predictor
            predictor.weight.zero_()
            predictor.weight[0, 0] = 20.0 * model.config.pre_div
            predictor.bias.zero_()


def primed_memory(model: MemoryTransformer, batch_size: int, generator: torch.Generator) -> Memory:
    """A memory at the policy's steady state: the states of a long past (embeddings of random
    tokens at consecutive steps), after the policy processed one block.

    The past is ``L + R`` raw states for every policy but Compressive, whose memory spans a
    longer past: its FIFO holds the last ``n_m`` states and its compressed memory the ``n_cm``
    groups of ``c`` states before them (compressed by the layer's own compression function), so
    its stream is ``n_m + c n_cm`` steps long and starts at step 0."""
    config = model.config
    length = max(_history(layer.policy, config) for layer in model.layers)
    layers = []
    with torch.no_grad():
        for layer in model.layers:
            tokens = torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)
            hidden = model.embedding(tokens.to(model.device))
            steps = torch.arange(length, device=model.device).expand(batch_size, -1)
            layers.append(_primed_layer(layer.policy, hidden, steps))
        memory = Memory(layers, next_step=length, policy=config.memory)
        block = torch.randint(0, config.vocab_size, (batch_size, config.block_len),
                              generator=generator)
        was_training = model.training
        model.eval()
        memory = model(block.to(model.device), memory).memory
        model.train(was_training)
    return memory


def _history(policy: MemoryPolicy, config: ModelConfig) -> int:
    """How many past steps the primed memory is built from."""
    if isinstance(policy, CompressivePolicy):
        return policy.mem_len + policy.rate * policy.cmem_len
    return config.max_span + config.ramp


def _primed_layer(policy: MemoryPolicy, hidden: torch.Tensor, steps: torch.Tensor
                  ) -> LayerMemory:
    """A layer's memory holding the states ``hidden`` (``[B, S, D]``) at ``steps`` (``[B, S]``,
    the steps ``0 .. S - 1``), as the policy would have stored them."""
    batch_size, length, width = hidden.shape
    empty = policy.empty_memory(batch_size, hidden.device, hidden.dtype)
    valid = torch.ones(batch_size, length, dtype=torch.bool, device=hidden.device)
    if not isinstance(policy, CompressivePolicy):
        return dataclasses.replace(empty, hidden=hidden, steps=steps, valid=valid)
    # The stream starts at step 0; groups 0 .. n_cm - 1 have left the FIFO and are compressed.
    cut = policy.rate * policy.cmem_len
    groups = hidden[:, :cut].reshape(batch_size, policy.cmem_len, policy.rate, width)
    compressed = LayerMemory(
        hidden=policy.compressor(groups),
        steps=steps[:, policy.rate - 1 : cut : policy.rate],  # a slot's step: its group's last
        valid=valid[:, : policy.cmem_len],
    )
    return dataclasses.replace(
        empty, hidden=hidden[:, cut:], steps=steps[:, cut:], valid=valid[:, cut:],
        compressed=compressed, origin=torch.zeros_like(empty.origin),
    )


def estimated_peak_gb(bench: BenchConfig, case: Case) -> float:
    """A deliberately generous estimate, to skip cases that cannot fit (not a measurement)."""
    kept = case.max_span if case.retention is None else case.retention * case.max_span
    states = bench.block_len + kept + bench.ramp
    per_state = 40 * bench.d_model * 4  # inputs, norms, k, v, rotary copies and their gradients
    attention = bench.n_heads * bench.block_len * 4 * (3 if bench.attention == "dense" else 1)
    return bench.n_layers * bench.batch_size * states * (per_state + attention) / 2**30


def rss_mb(key: str = "VmRSS") -> float:
    """This process's resident memory in MB: ``VmRSS`` (now) or ``VmHWM`` (peak), Linux only."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def _reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False when the platform cannot."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_mb(device: torch.device, resettable: bool) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resettable:
        return rss_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def case_model(bench: BenchConfig, case: Case) -> MemoryTransformer:
    """The fresh model of a synthetic case (at controlled retention for Expire-Span), on the
    benchmark's device."""
    torch.manual_seed(bench.seed)
    model = MemoryTransformer(ModelConfig(
        vocab_size=bench.vocab_size, d_model=bench.d_model, n_layers=bench.n_layers,
        n_heads=bench.n_heads, block_len=bench.block_len, max_span=case.max_span,
        memory=case.memory, ramp=bench.ramp, attention=bench.attention,
    ))
    if case.retention is not None:
        set_retention(model, case.retention, bench.seed)
    return model.to(_device(bench))


def measure(bench: BenchConfig, case: Case) -> dict[str, Any]:
    """One synthetic case: a fresh model (at controlled retention for Expire-Span), random tokens,
    a primed memory."""
    generator = torch.Generator().manual_seed(bench.seed + 1)
    model = case_model(bench, case)

    def batches(step: int):
        tokens = torch.randint(0, bench.vocab_size, (bench.batch_size, bench.block_len + 1),
                               generator=generator)
        return tokens[:, :-1], tokens[:, 1:], torch.ones(bench.batch_size, bench.block_len)

    memory = primed_memory(model, bench.batch_size, generator)
    return time_training(bench, case, model, batches, memory)


def time_training(bench: BenchConfig, case: Case, model: MemoryTransformer, batches: Batches,
                  memory: Memory) -> dict[str, Any]:
    """Time ``warmup_steps + steps`` training steps from ``memory``; report the median."""
    device = model.device
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    resettable = _reset_peak(device)
    baseline_mb = _current_mb(device)
    seconds, cpu_seconds, memory_sizes, cache_sizes = [], [], [], []
    for step in range(bench.warmup_steps + bench.steps):
        tokens, targets, weights = (t.to(device) for t in batches(step))
        _synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        out = model(tokens, memory)
        losses = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(),
                                 reduction="none")
        loss = (losses * weights.flatten()).sum() / weights.sum().clamp_min(1) + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_optimizer_step()
        _synchronize(device)
        elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
        memory = out.memory
        if step >= bench.warmup_steps:
            seconds.append(elapsed)
            cpu_seconds.append(cpu_elapsed)
            memory_sizes.append(float(out.memory_size.mean()))
            cache_sizes.append(float(memory.sizes.float().mean()))
    peak_mb = _peak_mb(device, resettable)
    return {
        "label": case.label,
        "policy": case.memory,
        "max_span": case.max_span,
        "retention": case.retention,
        "ms_per_batch": 1000 * statistics.median(seconds),
        "ms_all": [1000 * s for s in seconds],
        "cpu_ms_per_batch": 1000 * statistics.median(cpu_seconds),
        "peak_mb": peak_mb,
        "peak_increase_mb": peak_mb - baseline_mb,
        "peak_scope": "timed steps" if resettable else "whole process",
        "memory_size": statistics.fmean(memory_sizes),
        "cache_size": statistics.fmean(cache_sizes),
        "tokens_per_batch": int(tokens.numel()),
        "device": str(device),
    }


def measure_checkpoint(bench: BenchConfig, case: Case, path: str) -> dict[str, Any]:
    """A trained model on its own task's validation stream, its memory warmed up by reading
    ``L + R`` tokens of it. With ``case.memory`` other than the checkpoint's policy, a fresh model
    of the same architecture with that policy and ``case.max_span`` is measured on the same data."""
    from expire_span.training.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, device=_device(bench))
    task, model = loaded.run.build_task(), loaded.model
    if case.memory != model.config.memory or case.max_span != model.config.max_span:
        torch.manual_seed(bench.seed)
        config = dataclasses.replace(model.config, memory=case.memory, max_span=case.max_span)
        model = MemoryTransformer(config).to(_device(bench))
    length, rows = model.config.block_len, range(bench.batch_size)
    warmup = -(-(model.config.max_span + model.config.ramp) // length)

    def batches(step: int):
        batch = task.batch("valid", warmup + step, rows, length)
        return batch.tokens, batch.targets, batch.weights

    memory = None
    with torch.no_grad():
        model.eval()
        for step in range(warmup):
            memory = model(task.batch("valid", step, rows, length).tokens.to(model.device),
                           memory).memory
    assert memory is not None
    return time_training(bench, case, model, batches, memory)


def _device(bench: BenchConfig) -> torch.device:
    from expire_span.training.loop import resolve_device

    return resolve_device(bench.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return rss_mb("VmRSS")


def _child(target: Callable[..., dict[str, Any]], args: tuple, results: Any) -> None:
    try:
        results.put(target(*args))
    except Exception as error:  # reported, not raised: the parent goes on with other cases
        case = args[1]
        results.put({"label": case.label, "max_span": case.max_span, "error": repr(error)})


def measure_isolated(bench: BenchConfig, case: Case, checkpoint: str | None = None
                     ) -> dict[str, Any]:
    """:func:`measure` (or :func:`measure_checkpoint`) in a fresh process, so that the peak
    memory is the case's own; errors, timeouts and skipped cases are reported, not raised."""
    estimate = estimated_peak_gb(bench, case)
    if estimate > bench.max_memory_gb:
        return {"label": case.label, "policy": case.memory, "max_span": case.max_span,
                "retention": case.retention,
                "skipped": f"estimated {estimate:.1f} GB > max_memory_gb={bench.max_memory_gb}"}
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    target, args = (measure, (bench, case)) if checkpoint is None else (
        measure_checkpoint, (bench, case, checkpoint))
    process = context.Process(target=_child, args=(target, args, results))
    process.start()
    try:
        result = results.get(timeout=bench.timeout_s)
    except queue.Empty:
        process.kill()
        result = {"label": case.label, "max_span": case.max_span,
                  "error": f"timed out after {bench.timeout_s:.0f} s"}
    process.join()
    if process.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"process exited with {process.exitcode}"
    return result


def run_benchmark(bench: BenchConfig, echo: Callable[[str], None] = print,
                  checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Every policy at every L; Expire-Span at every retention, each followed by a
    Transformer-XL whose window equals the average memory size Expire-Span measured.

    With ``checkpoint``: the trained model on its task, a Transformer-XL of the same architecture
    and L, and one whose window matches the trained model's average memory size."""
    records: list[dict[str, Any]] = []

    def run(case: Case) -> dict[str, Any]:
        echo(f"measuring {case.label} at L={case.max_span} ...")
        record = measure_isolated(bench, case, checkpoint)
        records.append(record)
        echo("  " + describe(record))
        return record

    def matched_xl(record: dict[str, Any], suffix: str) -> None:
        if "memory_size" in record and "transformer-xl" in bench.policies:
            window = max(bench.block_len, round(record["memory_size"]))
            run(Case(f"transformer-xl matched {suffix}", "transformer-xl", window))
            records[-1]["matched_to_span"] = record["max_span"]

    if checkpoint is not None:
        from expire_span.training.checkpoint import load_checkpoint

        config = load_checkpoint(checkpoint).model.config
        bench.block_len = config.block_len
        trained = run(Case(f"{config.memory} trained", config.memory, config.max_span))
        trained["retention"] = "trained"
        run(Case("transformer-xl", "transformer-xl", config.max_span))
        matched_xl(trained, "trained")
        return records
    for span in bench.spans:
        for policy in bench.policies:
            if policy != "expire-span":
                run(Case(policy, policy, span))
                continue
            for retention in bench.retentions:
                record = run(Case(f"expire-span r={retention:g}", policy, span, retention))
                matched_xl(record, f"r={retention:g}")
    return records


def describe(record: dict[str, Any]) -> str:
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    if "error" in record:
        return f"failed: {record['error']}"
    return (f"{record['ms_per_batch']:.1f} ms/batch ({batch_ms(record):.1f} compared), "
            f"peak +{record['peak_increase_mb']:.0f} MB, "
            f"memory size {record['memory_size']:.0f}")


def batch_ms(record: dict[str, Any]) -> float:
    """The time a case's comparisons use: on the CPU the process's CPU time per batch (the
    compute it costs, whatever else runs on the machine; equal to wall time with one thread on an
    idle machine), on a GPU the wall time (synchronised)."""
    if record.get("device") == "cpu" and "cpu_ms_per_batch" in record:
        return record["cpu_ms_per_batch"]
    return record["ms_per_batch"]


def ratio_lines(records: list[dict[str, Any]]) -> list[str]:
    """The comparisons the efficiency claims are about, as ratios measured in this run (times
    from :func:`batch_ms`)."""
    ok = [r for r in records if "ms_per_batch" in r]
    lines = []
    for es in (r for r in ok if r["policy"] == "expire-span" and r["retention"] is not None):
        suffix = "trained" if es["retention"] == "trained" else f"r={es['retention']:g}"
        matched = next((r for r in ok if r["label"] == f"transformer-xl matched {suffix}"
                        and r.get("matched_to_span") == es["max_span"]), None)
        full = next((r for r in ok if r["label"] == "transformer-xl"
                     and r["max_span"] == es["max_span"]), None)
        text = f"L={es['max_span']}, {suffix}: "
        parts = []
        if matched:
            parts.append(f"time vs XL(window={matched['max_span']}) "
                         f"{batch_ms(es) / batch_ms(matched):.2f}x")
        if full:
            parts.append(f"XL(L) / ES time {batch_ms(full) / batch_ms(es):.1f}x, "
                         f"peak increase {full['peak_increase_mb'] / es['peak_increase_mb']:.1f}x")
        if parts:
            lines.append(text + "; ".join(parts))
    by_retention: dict[float, list[dict[str, Any]]] = {}
    for es in (r for r in ok if r["policy"] == "expire-span"
               and isinstance(r["retention"], float)):
        by_retention.setdefault(es["retention"], []).append(es)
    for retention, series in sorted(by_retention.items()):
        series.sort(key=lambda r: r["max_span"])
        if len(series) > 1:
            first, last = series[0], series[-1]
            lines.append(
                f"r={retention:g}, L {first['max_span']} -> {last['max_span']}: time x"
                f"{batch_ms(last) / batch_ms(first):.2f}, memory size x"
                f"{last['memory_size'] / first['memory_size']:.2f}"
            )
    return lines


def markdown_table(records: list[dict[str, Any]]) -> str:
    rows = ["| case | L | ms / batch (wall) | ms / batch (compared) | peak increase (MB) "
            "| peak (MB) | avg memory size |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        if "ms_per_batch" in r:
            rows.append(f"| {r['label']} | {r['max_span']} | {r['ms_per_batch']:.1f} | "
                        f"{batch_ms(r):.1f} | "
                        f"{r['peak_increase_mb']:.0f} | {r['peak_mb']:.0f} | "
                        f"{r['memory_size']:.1f} |")
        else:
            rows.append(f"| {r['label']} | {r['max_span']} | {describe(r)} | | | | |")
    return "\n".join(rows)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Time and peak memory against L, one line per case label (matched XL runs excluded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "ms_per_batch" in r and "matched" not in r["label"]:
            series.setdefault(r["label"], []).append(r)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in sorted(series.items()):
        points.sort(key=lambda r: r["max_span"])
        spans = [p["max_span"] for p in points]
        left.plot(spans, [batch_ms(p) for p in points], marker="o", label=label)
        right.plot(spans, [p["peak_increase_mb"] for p in points], marker="o", label=label)
    for axis, title in ((left, "time per batch (ms; CPU time on CPU)"),
                        (right, "peak memory increase (MB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("maximum span L")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save(records: list[dict[str, Any]], bench: BenchConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": dataclasses.asdict(bench), "records": records,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out_dir / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(records, out_dir / "bench.png")
