"""``expire-span plot``: training curves of a run (loss, metric, memory size per layer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from expire_span.analysis import plot_run


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="expire-span plot",
                                     description="Plot a run's metrics.jsonl.")
    parser.add_argument("run_dir", help="the run directory (holding metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    print(f"wrote {plot_run(run_dir, out)}")
    return 0
