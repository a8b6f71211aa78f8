"""``expire-span bench``: training time, peak memory and memory size of policies against L."""

from __future__ import annotations

import argparse
from pathlib import Path

from expire_span.benchmarking import (
    BenchConfig,
    markdown_table,
    ratio_lines,
    run_benchmark,
    save,
)
from expire_span.cli.flags import add_dataclass_flags, given_sections


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expire-span bench",
        description="Measure training time per batch, peak memory and average memory size of "
        "memory policies at several maximum spans L (lists are space-separated: "
        "--spans 1024 4096).",
    )
    parser.add_argument("--checkpoint", help="measure a trained run (on its task) against "
                        "Transformer-XL instead of synthetic cases")
    parser.add_argument("--out", default="runs/bench", help="where bench.json and bench.png go")
    add_dataclass_flags(parser.add_argument_group("benchmark"), BenchConfig, "bench")
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    bench = BenchConfig(**given_sections(args).get("bench", {}))
    records = run_benchmark(bench, checkpoint=args.checkpoint)
    save(records, bench, Path(args.out))
    print()
    print(markdown_table(records))
    print()
    for line in ratio_lines(records):
        print(line)
    print(f"\nwrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.png'}")
    return 0
