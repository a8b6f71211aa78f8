"""Validation success and memory at the decision step against updates, for several RL runs in one
figure (docs/rl.md's seed figures). Each run is ``METRICS_JSONL[:LABEL]``; ``--memory-limit``
draws the memory the claim allows (e.g. 0.25 x the mean corridor).

    python benchmarks/rl_curves.py --runs a/metrics.jsonl:"seed 0" b/metrics.jsonl:"seed 1" \\
        --memory-limit 62 --out docs/images/rl-corridor-far.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

from expire_span.analysis.curves import read_metrics_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def validation_rows(path: Path) -> list[dict]:
    """The ``valid`` records of a metrics file, in order."""
    return [row for row in read_metrics_file(path) if row.get("split") == "valid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="METRICS_JSONL[:LABEL]")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="a horizontal line on the memory panel")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    figure, (success_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in args.runs:
        path, _, label = spec.partition(":")
        rows = validation_rows(Path(path))
        if not rows:
            raise SystemExit(f"{path}: no validation records")
        steps = [row["step"] for row in rows]
        success_axis.plot(steps, [row["success_rate"] for row in rows], label=label or path)
        memory_axis.plot(steps, [row["memory_at_decision"] for row in rows], label=label or path)
    if args.memory_limit is not None:
        memory_axis.axhline(args.memory_limit, color="black", linestyle="--", linewidth=1,
                            label=f"limit {args.memory_limit:g}")
    success_axis.set(xlabel="update", ylabel="validation success (greedy)", ylim=(-0.02, 1.02))
    memory_axis.set(xlabel="update", ylabel="memory at the decision step")
    for axis in (success_axis, memory_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(args.title)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
