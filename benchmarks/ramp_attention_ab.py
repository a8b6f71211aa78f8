"""A/B of Expire-Span's training step on CPU: today's code (new) vs one piece of it as it was at
an earlier commit (old), each against a Transformer-XL with as many keys (window = Expire-Span's
measured average memory size), as in ``expire-span bench``. The piece: ``--part decide`` (the
policy's mask; at the default ``--old`` a full differentiable mask on SDPA's math path, before
the bias gradient moved to the ramp columns) or ``--part column-grad`` (the fused attention's
ramp-column gradient, ``model/ramp_attention.py``). Run it from the repository (it reads the old
code with ``git show``).

All cases run in this one process, alternating old / new / XL for ``--rounds`` rounds; the report
gives the median over rounds of each case's median step time, and the ratios of these medians.

    OMP_NUM_THREADS=1 python benchmarks/ramp_attention_ab.py --cases 16384:0.25 16384:0.05 4096:0.25
    OMP_NUM_THREADS=1 python benchmarks/ramp_attention_ab.py --part column-grad --old dc462df \
        --cases 1024:0.05 1024:0.25 4096:0.05 --batch-size 16 --calls 40

With ``--part column-grad --calls N`` it also times the two column gradients alone, alternating,
N calls at a time, on the arguments of the case's last training step (a measurement the step
times' noise on a shared machine cannot hide).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from unittest import mock

import torch

from expire_span.benchmarking import BenchConfig, Case, measure
from expire_span.model import ramp_attention
from expire_span.policies.expire_span import ExpireSpanPolicy

PARTS = {
    "decide": ("src/expire_span/policies/expire_span.py", ExpireSpanPolicy, "decide",
               lambda module: module.ExpireSpanPolicy.decide),
    "column-grad": ("src/expire_span/model/ramp_attention.py", ramp_attention, "_column_grad",
                    lambda module: module._column_grad),
}
"""``--part``: the file it is read from, where it is patched in, and how to find it there."""


def old_part(part: str, revision: str) -> Callable:
    """The ``part`` as it was at ``revision``."""
    path, _, _, find = PARTS[part]
    source = subprocess.run(["git", "show", f"{revision}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"old_{part.replace('-', '_')}")
    exec(compile(source, path, "exec"), module.__dict__)
    return find(module)


def step_ms(bench: BenchConfig, case: Case, part: str, old: Callable | None = None) -> dict:
    if old is None:
        return measure(bench, case)
    _, owner, name, _ = PARTS[part]
    with mock.patch.object(owner, name, old):
        return measure(bench, case)


def column_grad_ms(bench: BenchConfig, case: Case, old: Callable, calls: int,
                   rounds: int) -> tuple[float, float]:
    """Median CPU ms per call of the ``old`` and today's column gradient, alternating, on the
    arguments of the case's last training step (checked to agree)."""
    today = ramp_attention._column_grad
    last: list[tuple] = []

    def capture(*args):
        last[:] = [args]
        return today(*args)

    with mock.patch.object(ramp_attention, "_column_grad", capture):
        measure(bench, case)
    args = last[0]
    torch.testing.assert_close(old(*args), today(*args))
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        for key, function in (("old", old), ("new", today)):
            started = time.process_time()
            for _ in range(calls):
                function(*args)
            times[key].append(1000 * (time.process_time() - started) / calls)
    return statistics.median(times["old"]), statistics.median(times["new"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["16384:0.25", "16384:0.05", "4096:0.25"],
                        help="L:retention")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--part", choices=sorted(PARTS), default="decide",
                        help="what the old revision supplies")
    parser.add_argument("--old", default="0cf4ddc", help="git revision of the old code")
    parser.add_argument("--batch-size", type=int, default=BenchConfig.batch_size)
    parser.add_argument("--calls", type=int, default=0,
                        help="with --part column-grad: also time the function alone, this many "
                        "calls per round")
    args = parser.parse_args()
    if args.calls and args.part != "column-grad":
        parser.error("--calls times the column gradient: use it with --part column-grad")
    old_code = old_part(args.part, args.old)
    bench = BenchConfig(steps=args.steps, batch_size=args.batch_size)
    for spec in args.cases:
        span, retention = int(spec.split(":")[0]), float(spec.split(":")[1])
        es = Case(f"expire-span r={retention:g}", "expire-span", span, retention)
        window = max(bench.block_len, round(step_ms(bench, es, args.part)["memory_size"]))
        xl = Case("transformer-xl matched", "transformer-xl", window)
        times: dict[str, list[float]] = {"old": [], "new": [], "xl": []}
        for _ in range(args.rounds):
            times["old"].append(step_ms(bench, es, args.part, old_code)["ms_per_batch"])
            times["new"].append(step_ms(bench, es, args.part)["ms_per_batch"])
            times["xl"].append(step_ms(bench, xl, args.part)["ms_per_batch"])
        old, new, base = (statistics.median(times[key]) for key in ("old", "new", "xl"))
        print(f"L={span} r={retention:g} XL window={window}: ms/step old {old:.1f}, new {new:.1f}, "
              f"XL {base:.1f}; ES/XL old {old / base:.2f}x, new {new / base:.2f}x; "
              f"new/old {new / old:.2f}  (rounds: {times})", flush=True)
        if args.calls:
            old, new = column_grad_ms(bench, es, old_code, args.calls, args.rounds)
            print(f"  column gradient alone: ms/call old {old:.2f}, new {new:.2f}, "
                  f"new/old {new / old:.2f}", flush=True)


if __name__ == "__main__":
    main()
