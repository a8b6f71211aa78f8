"""A/B of Expire-Span's training step on CPU: mask and bias gradient on ramp columns only (new)
vs the policy's ``decide`` of an earlier commit (old: a full differentiable mask, SDPA's math
path), each against a Transformer-XL with as many keys (window = Expire-Span's measured average
memory size), as in ``expire-span bench``. Run it from the repository (it reads the old code with
``git show``).

All cases run in this one process, alternating old / new / XL for ``--rounds`` rounds; the report
gives the median over rounds of each case's median step time, and the ratios of these medians.

    OMP_NUM_THREADS=1 python benchmarks/ramp_attention_ab.py --cases 16384:0.25 16384:0.05 4096:0.25
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import types
from collections.abc import Callable
from unittest import mock

from expire_span.benchmarking import BenchConfig, Case, measure
from expire_span.policies.expire_span import ExpireSpanPolicy


def old_decide(revision: str) -> Callable:
    """``ExpireSpanPolicy.decide`` as it was at ``revision``."""
    path = "src/expire_span/policies/expire_span.py"
    source = subprocess.run(["git", "show", f"{revision}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("old_expire_span")
    exec(compile(source, path, "exec"), module.__dict__)
    return module.ExpireSpanPolicy.decide


def step_ms(bench: BenchConfig, case: Case, decide: Callable | None = None) -> dict:
    if decide is None:
        return measure(bench, case)
    with mock.patch.object(ExpireSpanPolicy, "decide", decide):
        return measure(bench, case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["16384:0.25", "16384:0.05", "4096:0.25"],
                        help="L:retention")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--old", default="0cf4ddc", help="git revision of the old policy")
    args = parser.parse_args()
    old_policy = old_decide(args.old)
    bench = BenchConfig(steps=args.steps)
    for spec in args.cases:
        span, retention = int(spec.split(":")[0]), float(spec.split(":")[1])
        es = Case(f"expire-span r={retention:g}", "expire-span", span, retention)
        window = max(bench.block_len, round(step_ms(bench, es)["memory_size"]))
        xl = Case("transformer-xl matched", "transformer-xl", window)
        times: dict[str, list[float]] = {"old": [], "new": [], "xl": []}
        for _ in range(args.rounds):
            times["old"].append(step_ms(bench, es, old_policy)["ms_per_batch"])
            times["new"].append(step_ms(bench, es)["ms_per_batch"])
            times["xl"].append(step_ms(bench, xl)["ms_per_batch"])
        old, new, base = (statistics.median(times[key]) for key in ("old", "new", "xl"))
        print(f"L={span} r={retention:g} XL window={window}: ms/step old {old:.1f}, new {new:.1f}, "
              f"XL {base:.1f}; ES/XL old {old / base:.2f}x, new {new / base:.2f}x; "
              f"new/old {new / old:.2f}  (rounds: {times})", flush=True)


if __name__ == "__main__":
    main()
