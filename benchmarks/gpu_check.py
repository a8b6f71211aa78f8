"""Every GPU figure of the project from one command: attention parity, precisions, NCCL, the
paper-shaped enwik8 efficiency table and the bench at L up to 64k.

    python benchmarks/gpu_check.py OUT_DIR [--budget-s 480] [--dry-run] [--parts NAME ...]

Writes ``OUT_DIR/gpu_check.json`` (every part's results, merged after each part, so a killed run
keeps what it measured) and ``OUT_DIR/gpu_check.log`` (everything printed), plus the bench's own
``OUT_DIR/bench.json`` and ``bench.png``. Parts (in this order, each in its own process with
its own time limit, killed with all its children when it runs over; a part that no longer fits
in what is left of ``--budget-s`` is skipped and said so):

- ``env``: torch, CUDA, the GPU, FlexAttention and NCCL availability.
- ``parity``: logits and every parameter's gradient of ``sdpa`` and ``flex`` against ``dense``,
  every policy, float32 and bfloat16 autocast, one training block after a primed memory (what
  ``benchmarks/gpu_parity.py`` checked, plus flex).
- ``precision``: ``expire-span train`` steps in bf16 and fp16 (loss scaling), sdpa and flex.
- ``nccl``: one ``DistributedDataParallel`` step in a one-process NCCL group.
- ``enwik8``: the paper's 12-layer enwik8 model (the ``enwik8-12l`` preset: d=512, 8 heads,
  inner 2048, M=512, L=16384; random bytes) for each policy at one batch size: ms per batch and
  peak GiB from a steady-state memory, ratios to Expire-Span beside the paper's (SPEC.md sec. 5).
- ``bench``: ``expire-span bench --device cuda`` at L = 16k and 64k (Expire-Span at controlled
  retention against Transformer-XL at L and at the matched window; Adaptive-Span and
  Compressive from a primed, steady-state memory).
- ``tests``: the test suite's CUDA-only tests (``tests/test_flex_attention.py``).

Without CUDA, or with ``--dry-run``, it lists the parts, says which need CUDA, runs what the CPU
can (``env``; ``parity`` at tiny shapes: dense against sdpa with gradients, flex forward only,
float32) and exits 0 when that passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PAPER = {  # SPEC.md section 5, Table 4 (enwik8, 12 layers): GB, ms per batch
    "expire-span": (15, 408), "transformer-xl": (27, 649), "adaptive-span": (20, 483),
    "compressive": (21, 838),
}
POLICIES = ("expire-span", "transformer-xl", "adaptive-span", "compressive")
TOLERANCE = {"float32": 2e-4, "bfloat16": 5e-2}  # relative to the reference's largest value


@dataclass(frozen=True)
class Part:
    name: str
    needs_cuda: bool
    budget_s: float
    """The most this part may take; less when less of the total budget is left."""
    min_s: float
    """Skipped when less than this is left."""
    about: str


PARTS = [
    Part("env", False, 30, 5, "torch, CUDA, GPU, FlexAttention, NCCL"),
    Part("parity", True, 150, 30, "dense / sdpa / flex: logits and gradients, fp32 and bf16"),
    Part("precision", True, 60, 20, "bf16 and fp16 training steps (expire-span train)"),
    Part("nccl", True, 30, 10, "one-process NCCL DistributedDataParallel step"),
    Part("enwik8", True, 150, 40, "paper-shaped enwik8 model, four policies: ms and GiB"),
    Part("bench", True, 80, 30, "expire-span bench --device cuda at L = 16k, 64k"),
    Part("tests", True, 50, 20, "the suite's CUDA-only tests"),
]


# ------------------------------------------------------------------------------------ parent


class Log:
    """Echoes to stdout and appends to the log file."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("a", buffering=1)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.handle.write(line + "\n")


def child_env() -> dict[str, str]:
    """The environment of every subprocess: unbuffered, and this checkout's ``src`` importable
    (the GPU machine runs its own python3, without this package installed)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def run_logged(command: list[str], timeout_s: float, log: Log, cwd: Path = ROOT) -> int | None:
    """Run ``command`` in its own process session, every line into the log; kill the whole
    session after ``timeout_s``. Returns the exit code, ``None`` when killed."""
    process = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    killed = False

    def kill() -> None:
        nonlocal killed
        killed = True
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), kill)
    timer.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log("    " + line.rstrip())
        process.wait()
    finally:
        timer.cancel()
    return None if killed else process.returncode


def parent(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    started = time.monotonic()
    cuda = cuda_available()
    dry = args.dry_run or not cuda
    selected = [p for p in PARTS if not args.parts or p.name in args.parts]
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "budget_s": args.budget_s, "dry_run": dry, "parts": {}}
    log(f"gpu_check: {len(selected)} parts, budget {args.budget_s:.0f} s, "
        f"CUDA {'available' if cuda else 'not available'}{', dry run' if dry else ''}")
    for part in selected:
        log(f"  {part.name:10s} {'needs CUDA' if part.needs_cuda else 'runs anywhere':14s} "
            f"up to {part.budget_s:.0f} s: {part.about}")
    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        for part in selected:
            left = args.budget_s - (time.monotonic() - started)
            record: dict[str, Any]
            if dry and part.needs_cuda and not (part.name == "parity"):
                record = {"status": "skipped", "reason": "needs CUDA"
                          + ("" if not cuda else " (dry run)")}
            elif left < part.min_s:
                record = {"status": "skipped",
                          "reason": f"time budget: {left:.0f} s left, needs {part.min_s:.0f} s"}
            else:
                limit = min(part.budget_s, left)
                log(f"== {part.name} (limit {limit:.0f} s)" + (" on CPU, tiny" if dry else ""))
                result = Path(scratch) / f"{part.name}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--worker", part.name,
                           "--result", str(result), "--limit-s", str(limit), "--scratch",
                           scratch, "--out-dir", str(out), "--enwik8-batch",
                           str(args.enwik8_batch)] + (["--cpu"] if dry else [])
                part_started = time.monotonic()
                code = run_logged(command, limit + 15, log)
                record = json.loads(result.read_text()) if result.exists() else {}
                record["seconds"] = round(time.monotonic() - part_started, 1)
                if code is None:
                    record["status"] = "killed"
                    record["reason"] = f"ran past its limit of {limit:.0f} s"
                elif code != 0 and record.get("status") != "failed":
                    record["status"] = "error"
                    record["reason"] = f"exit code {code}"
                record.setdefault("status", "ok")
            failed |= record["status"] in ("failed", "error")
            summary["parts"][part.name] = record
            summary["seconds"] = round(time.monotonic() - started, 1)
            (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
            reason = f" ({record['reason']})" if "reason" in record else ""
            log(f"-- {part.name}: {record['status']}{reason}")
    for line in report_lines(summary):
        log(line)
    log(f"gpu_check: done in {time.monotonic() - started:.0f} s; wrote {out / 'gpu_check.json'} "
        f"and {out / 'gpu_check.log'}")
    if dry:
        cuda_parts = ", ".join(p.name for p in selected if p.needs_cuda)
        log(f"gpu_check: without CUDA only the CPU checks ran; needs CUDA: {cuda_parts}")
    return 1 if failed else 0


def report_lines(summary: dict[str, Any]) -> list[str]:
    """The headline figures: parity verdicts and the enwik8 table."""
    lines = []
    parity = summary["parts"].get("parity", {})
    for item in parity.get("items", []):
        grads = item.get("grads")
        lines.append(f"parity {item['policy']:15s} {item['precision']:9s} {item['backend']:5s} "
                     f"logits {item.get('logits', float('nan')):.1e} grads "
                     f"{'forward only' if grads is None else f'{grads:.1e}'} {item['verdict']}")
    enwik8 = summary["parts"].get("enwik8", {})
    if enwik8.get("table"):
        lines.append("enwik8, 12 layers (ratios to Expire-Span of the same backend; paper's in "
                     "brackets):")
        lines.extend(enwik8["table"])
    return lines


def cuda_available() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], env=child_env(), timeout=120
                              ).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ------------------------------------------------------------------------------------ workers


class Worker:
    """A part's process: items are appended to ``result`` as they are measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.limit_s
        self.record: dict[str, Any] = {"items": []}
        self.device = "cpu" if args.cpu else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        Path(self.args.result).write_text(json.dumps(self.record, indent=1, default=str))

    def add(self, item: dict[str, Any]) -> None:
        self.record["items"].append(item)
        print(json.dumps(item, default=str), flush=True)
        self.save()

    def skip_rest(self, what: str) -> None:
        self.record.setdefault("skipped", []).append(what)
        print(f"skipped (time): {what}", flush=True)
        self.save()


def worker_env(w: Worker) -> None:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        from torch.nn.attention import flex_attention  # noqa: F401

        info["flex_attention"] = True
    except ImportError as error:
        info["flex_attention"] = repr(error)
    import torch.distributed as dist

    info["nccl"] = dist.is_available() and dist.is_nccl_available()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    w.record.update(info)
    print(json.dumps(info), flush=True)
    w.save()


def parity_case(policy: str, backend: str, precision: str, tokens: Any, memory: Any,
                device: str, shape: dict[str, int]):
    """One training block after ``memory`` (primed by the dense model): logits and gradients."""
    import torch

    model = parity_model(policy, backend, shape).to(device).train()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    forward_only = backend == "flex" and device == "cpu"  # FlexAttention has no CPU backward
    torch.manual_seed(5)
    with torch.autocast(device, dtype=dtype, enabled=precision == "bfloat16"), \
            torch.set_grad_enabled(not forward_only):
        out = model(tokens, memory)
        loss = out.logits.float().square().mean() + out.aux_loss
    if forward_only:
        return out.logits.float().detach(), None
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float().detach(), grads


def parity_model(policy: str, backend: str, shape: dict[str, int]):
    import torch

    from expire_span import MemoryTransformer, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=shape["d_model"], n_layers=shape["layers"],
                         n_heads=shape["heads"], block_len=shape["block"],
                         max_span=shape["span"], memory=policy, ramp=shape["ramp"],
                         init_percentage=0.3, adapt_span_init=0.5, attention=backend)
    model = MemoryTransformer(config)
    for layer in model.layers:  # varied spans: memories expire at different times, heads differ
        predictor = getattr(layer.policy, "span_predictor", None)
        if predictor is not None:
            torch.nn.init.normal_(predictor.weight, std=1.0)
        if hasattr(layer.policy, "span_fraction"):
            torch.nn.init.uniform_(layer.policy.span_fraction, 0.1, 0.9)
    return model


def relative(a: Any, b: Any) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def worker_parity(w: Worker) -> None:
    import torch

    cpu = w.device == "cpu"
    shape = (dict(d_model=32, layers=2, heads=4, block=16, span=64, ramp=8, batch=2, length=96)
             if cpu else
             dict(d_model=256, layers=3, heads=8, block=128, span=1024, ramp=32, batch=4,
                  length=2048))
    if cpu:
        import expire_span.model.flex_attention as flex_module

        flex_module.BLOCK_SIZE = 8
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (shape["batch"], shape["length"]), generator=generator)
    tokens = tokens.to(w.device)
    block = shape["block"]
    failed = False
    for precision in ("float32",) if cpu else ("float32", "bfloat16"):
        for policy in POLICIES:
            if w.left() < 10:
                w.skip_rest(f"parity {policy} {precision}")
                continue
            primer = parity_model(policy, "dense", shape).to(w.device).eval()
            memory = None
            with torch.no_grad():
                for piece in tokens[:, :-block].split(block, dim=1):
                    memory = primer(piece, memory).memory
            reference = parity_case(policy, "dense", precision, tokens[:, -block:], memory,
                                    w.device, shape)
            for backend in ("sdpa", "flex"):
                started = time.monotonic()
                try:
                    logits, grads = parity_case(policy, backend, precision, tokens[:, -block:],
                                                memory, w.device, shape)
                except Exception as error:  # reported; the other cases still run
                    w.add({"policy": policy, "precision": precision, "backend": backend,
                           "verdict": "ERROR", "error": repr(error)[:500]})
                    failed = True
                    continue
                item: dict[str, Any] = {"policy": policy, "precision": precision,
                                        "backend": backend,
                                        "logits": relative(logits, reference[0]),
                                        "seconds": round(time.monotonic() - started, 1)}
                if grads is not None:
                    diffs = {n: relative(grads[n], g) for n, g in reference[1].items()}
                    worst = max(diffs, key=diffs.get)
                    item.update(grads=diffs[worst], worst_grad=worst,
                                same_params=sorted(grads) == sorted(reference[1]))
                    item["span_grad"] = any("span" in n for n in grads)
                else:
                    item.update(grads=None, note="forward only (no CPU backward)")
                worst_value = max(item["logits"], item["grads"] or 0.0)
                ok = worst_value <= TOLERANCE[precision] and item.get("same_params", True)
                item["verdict"] = "ok" if ok else "FAIL"
                failed |= not ok
                w.add(item)
    w.record["status"] = "failed" if failed else "ok"
    w.save()


def worker_precision(w: Worker) -> None:
    cases = [(p, a) for p in ("bf16", "fp16") for a in ("auto", "flex")]
    failed = False
    for precision, attention in cases:
        if w.left() < 10:
            w.skip_rest(f"precision {precision} {attention}")
            continue
        run_dir = Path(w.args.scratch) / f"train-{precision}-{attention}"
        command = [sys.executable, "-m", "expire_span", "train", "--preset", "copy-test",
                   "--device", "cuda", "--precision", precision, "--attention", attention,
                   "--steps", "3", "--log-every", "1", "--eval-every", "1000",
                   "--checkpoint-every", "1000", "--no-progress", "--out", str(run_dir)]
        started = time.monotonic()
        done = subprocess.run(command, env=child_env(), capture_output=True, text=True,
                              timeout=max(5.0, w.left()))
        losses = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                row = json.loads(line)
                if row.get("split") == "train" and "loss" in row:
                    losses.append(row["loss"])
        ok = done.returncode == 0 and bool(losses) and all(
            isinstance(x, float) and x == x and abs(x) != float("inf") for x in losses)
        failed |= not ok
        w.add({"precision": precision, "attention": attention, "losses": losses,
               "verdict": "ok" if ok else "FAIL", "seconds": round(time.monotonic() - started, 1),
               "stderr_tail": done.stderr[-800:] if not ok else ""})
    w.record["status"] = "failed" if failed else "ok"
    w.save()


def worker_nccl(w: Worker) -> None:
    import socket

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = parity_model("expire-span", "auto", dict(d_model=128, layers=2, heads=4,
                                                          block=64, span=256, ramp=16))
        model = model.cuda().train()
        ddp = DistributedDataParallel(model, device_ids=[0], find_unused_parameters=True)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        tokens = torch.randint(0, 256, (4, 128), device="cuda")
        out = ddp(tokens)
        loss = out.logits.float().square().mean() + out.aux_loss
        loss.backward()
        optimizer.step()
        total = torch.ones(1, device="cuda")
        dist.all_reduce(total)
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(loss)) and float(total) == 1.0
        w.add({"backend": dist.get_backend(), "loss": float(loss), "all_reduce": float(total),
               "verdict": "ok" if ok else "FAIL", "seconds": round(time.monotonic() - started, 1)})
        w.record["status"] = "ok" if ok else "failed"
    finally:
        dist.destroy_process_group()
    w.save()


def worker_enwik8(w: Worker) -> None:
    """Each case in a fresh process (its own peak memory), Expire-Span first; sdpa for the four
    policies, then flex for the four."""
    cases = [(p, "auto") for p in POLICIES] + [(p, "flex") for p in POLICIES]
    for policy, attention in cases:
        if w.left() < 25:
            w.skip_rest(f"enwik8 {policy} {attention}")
            continue
        result = Path(w.args.scratch) / f"enwik8-{policy}-{attention}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--enwik8-case", policy,
                   "--attention", attention, "--enwik8-batch", str(w.args.enwik8_batch),
                   "--result", str(result)]
        timeout = min(90.0, w.left() - 5)
        try:
            done = subprocess.run(command, env=child_env(), capture_output=True, text=True,
                                  timeout=timeout, start_new_session=True)
            item = json.loads(result.read_text()) if result.exists() else {
                "policy": policy, "attention": attention,
                "error": done.stderr[-800:] or f"exit code {done.returncode}"}
        except subprocess.TimeoutExpired:
            item = {"policy": policy, "attention": attention,
                    "error": f"timed out after {timeout:.0f} s"}
        w.add(item)
    w.record["table"] = enwik8_table(w.record["items"])
    w.save()


def enwik8_table(items: list[dict[str, Any]]) -> list[str]:
    lines = ["| policy | attention | batch | memory size | ms/batch | peak GiB | ms ratio | "
             "GiB ratio |", "|---|---|---|---|---|---|---|---|"]
    for item in items:
        if "ms_per_batch" not in item or item.get("peak_gib") is None:
            lines.append(f"| {item['policy']} | {item['attention']} | | | "
                         f"{item.get('error', 'no result')[:60]!r} | | | |")
            continue
        base = next((r for r in items if r["policy"] == "expire-span"
                     and r["attention"] == item["attention"] and "ms_per_batch" in r), None)
        paper_gb, paper_ms = PAPER[item["policy"]]
        ratios = ("", "")
        if base is not None:
            ratios = (f"{item['ms_per_batch'] / base['ms_per_batch']:.2f} "
                      f"({paper_ms / PAPER['expire-span'][1]:.2f})",
                      f"{item['peak_gib'] / base['peak_gib']:.2f} "
                      f"({paper_gb / PAPER['expire-span'][0]:.2f})")
        lines.append(f"| {item['policy']} | {item['attention']} | {item['batch']} | "
                     f"{item['memory_size']:.0f} | {item['ms_per_batch']:.0f} | "
                     f"{item['peak_gib']:.1f} | {ratios[0]} | {ratios[1]} |")
    return lines


def enwik8_case(args: argparse.Namespace) -> None:
    """The ``enwik8-12l`` preset's model with ``args.enwik8_case`` as policy, random bytes:
    memory filled by reading L + R bytes block by block (no gradients, sdpa), then 1 warm-up and
    3 timed training steps (forward, backward, Adam) at the preset's settings."""
    import torch
    import torch.nn.functional as F

    from expire_span import MemoryTransformer, ModelConfig
    from expire_span.training.presets import get_preset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(0.95)
    values = dict(get_preset("enwik8-12l").config["model"])
    values.update(memory=args.enwik8_case, vocab_size=256, attention="auto")
    if args.tiny:  # a check of this code on CPU, not a measurement
        values.update(n_layers=2, d_model=64, d_inner=128, block_len=64, max_span=512, ramp=16)
    values["adapt_span_init"] = values.get("init_percentage", 0.1)  # both start at p L
    config = ModelConfig(**values)
    torch.manual_seed(0)
    model = MemoryTransformer(config).to(device)
    batch, block = args.enwik8_batch, config.block_len
    generator = torch.Generator().manual_seed(1)

    def data() -> Any:
        return torch.randint(0, 256, (batch, block + 1), generator=generator).to(device)

    memory = None
    model.eval()
    with torch.no_grad():
        for _ in range(-(-(config.max_span + config.ramp) // block)):
            memory = model(data()[:, :-1], memory).memory
    if args.attention != "auto":
        timed = MemoryTransformer(dataclasses.replace(config, attention=args.attention))
        timed = timed.to(device)
        timed.load_state_dict(model.state_dict())
        model = timed
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=7e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, sizes = [], []
    for step in range(4):
        tokens = data()
        sync()
        started = time.perf_counter()
        out = model(tokens[:, :-1], memory)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        optimizer.step()
        model.after_optimizer_step()
        sync()
        memory = out.memory
        if step >= 1:
            times.append(time.perf_counter() - started)
            sizes.append(float(out.memory_size.mean()))
    result = {"policy": args.enwik8_case, "attention": args.attention, "batch": batch,
              "ms_per_batch": 1000 * statistics.median(times),
              "ms_all": [round(1000 * t, 1) for t in times],
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
              "memory_size": statistics.fmean(sizes), "loss": float(loss),
              "precision": "fp32", "device": device}
    Path(args.result).write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


def worker_bench(w: Worker) -> None:
    out = Path(w.args.out_dir)
    command = [sys.executable, "-m", "expire_span", "bench", "--device", "cuda",
               "--policies", *POLICIES, "--spans", "16384", "65536", "--retentions", "0.05",
               "--steps", "3", "--warmup-steps", "1", "--max-memory-gb", "120",
               "--timeout-s", "60", "--out", str(out)]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, env=child_env(), timeout=max(5.0, w.left() - 2))
    bench = out / "bench.json"
    if bench.exists():
        w.record["bench"] = json.loads(bench.read_text())
    w.record["status"] = "ok" if done.returncode == 0 and bench.exists() else "failed"
    w.save()


def worker_tests(w: Worker) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_flex_attention.py",
               "-k", "cuda"]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=max(5.0, w.left() - 2))
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    w.record.update(summary=done.stdout.strip().splitlines()[-1:] if done.stdout else [],
                    status="ok" if done.returncode == 0 else "failed")
    w.save()


WORKERS: dict[str, Callable[[Worker], None]] = {
    "env": worker_env, "parity": worker_parity, "precision": worker_precision,
    "nccl": worker_nccl, "enwik8": worker_enwik8, "bench": worker_bench, "tests": worker_tests,
}


def parity_main() -> int:
    """``benchmarks/gpu_parity.py``: the parity part alone, printed; exit 2 without CUDA."""
    if not cuda_available():
        print("no CUDA device: nothing to check (CPU parity is in the test suite)")
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        args = argparse.Namespace(limit_s=1e9, result=str(Path(scratch) / "p.json"), cpu=False)
        worker = Worker(args)
        worker_parity(worker)
    return 0 if worker.record.get("status") == "ok" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="Parts: " + "; ".join(f"{p.name} ({'CUDA' if p.needs_cuda else 'any'}, "
                                     f"<= {p.budget_s:.0f} s): {p.about}" for p in PARTS))
    parser.add_argument("out_dir", nargs="?", help="folder for gpu_check.json, gpu_check.log, "
                        "bench.json, bench.png")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="total time; parts that no longer fit are skipped (default 480)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the parts and run only the CPU checks, at tiny shapes")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS],
                        help="run only these parts (default: all, in the order above)")
    parser.add_argument("--enwik8-batch", type=int, default=4,
                        help="the fixed batch size of the enwik8 part (default 4)")
    for internal in ("--worker", "--result", "--scratch", "--enwik8-case", "--attention"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    parser.add_argument("--limit-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", dest="out_dir_internal", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.enwik8_case:
        enwik8_case(args)
        return 0
    if args.worker:
        args.out_dir = args.out_dir_internal
        worker = Worker(args)
        WORKERS[args.worker](worker)
        return 1 if worker.record.get("status") == "failed" else 0
    if not args.out_dir:
        build_parser().error("OUT_DIR is required")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
