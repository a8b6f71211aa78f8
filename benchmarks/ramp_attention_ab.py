"""A/B of Expire-Span's training step on CPU: bias gradient on ramp columns (new) vs SDPA's math
path (old, the policy withholding ``bias_grad_columns``), each against a Transformer-XL with as
many keys (window = Expire-Span's measured average memory size), as in ``expire-span bench``.

All cases run in this one process, alternating old / new / XL for ``--rounds`` rounds; the report
gives the median over rounds of each case's median step time, and the ratios of these medians.

    OMP_NUM_THREADS=1 python benchmarks/ramp_attention_ab.py --cases 16384:0.25 16384:0.05 4096:0.25
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

from expire_span.policies.expire_span import ExpireSpanPolicy
from expire_span.training.benchmark import BenchConfig, Case, measure


def step_ms(bench: BenchConfig, case: Case, ramp_columns: bool = True) -> dict:
    if ramp_columns:
        return measure(bench, case)
    with mock.patch.object(ExpireSpanPolicy, "_ramp_columns", lambda *args: None):
        return measure(bench, case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["16384:0.25", "16384:0.05", "4096:0.25"],
                        help="L:retention")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    bench = BenchConfig(steps=args.steps)
    for spec in args.cases:
        span, retention = int(spec.split(":")[0]), float(spec.split(":")[1])
        es = Case(f"expire-span r={retention:g}", "expire-span", span, retention)
        window = max(bench.block_len, round(step_ms(bench, es)["memory_size"]))
        xl = Case("transformer-xl matched", "transformer-xl", window)
        times: dict[str, list[float]] = {"old": [], "new": [], "xl": []}
        for _ in range(args.rounds):
            times["old"].append(step_ms(bench, es, ramp_columns=False)["ms_per_batch"])
            times["new"].append(step_ms(bench, es)["ms_per_batch"])
            times["xl"].append(step_ms(bench, xl)["ms_per_batch"])
        old, new, base = (statistics.median(times[key]) for key in ("old", "new", "xl"))
        print(f"L={span} r={retention:g} XL window={window}: ms/step old {old:.1f}, new {new:.1f}, "
              f"XL {base:.1f}; ES/XL old {old / base:.2f}x, new {new / base:.2f}x; "
              f"new/old {new / old:.2f}  (rounds: {times})", flush=True)


if __name__ == "__main__":
    main()
