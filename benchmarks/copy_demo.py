"""Memory policies on the copy task, one config and one training budget for all.

Trains each model of ``--models`` on the ``copy-cpu`` preset (or ``--preset``) one after the other
and prints a markdown table of accuracy, average memory size and wall time. A model is a policy
name, optionally with its own maximum span: ``transformer-xl:128``. The default list is the
README's demo (Expire-Span against Transformer-XL at L and at L/4):

    python benchmarks/copy_demo.py --out runs/copy-demo
    python benchmarks/copy_demo.py --preset copy-test --out runs/baselines \\
        --models expire-span,transformer-xl,adaptive-span,compressive
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from expire_span.training import RunConfig, Trainer, get_preset
from expire_span.training.config import merge


def parse_models(text: str | None, max_span: int) -> list[tuple[str, dict[str, Any]]]:
    """``"a,b:128"`` -> ``[("a", {"memory": "a"}), ("b-128", {"memory": "b", "max_span": 128})]``;
    ``None`` gives the default list."""
    if text is None:
        text = f"expire-span,transformer-xl,transformer-xl:{max_span // 4}"
    runs = []
    for spec in text.split(","):
        policy, _, span = spec.strip().partition(":")
        model: dict[str, Any] = {"memory": policy}
        if span:
            model["max_span"] = int(span)
        runs.append((f"{policy}-{span}" if span else policy, model))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="copy-cpu")
    parser.add_argument("--out", default="runs/copy-demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", help="comma-separated policy[:max_span] list "
                        "(default: expire-span, transformer-xl at L and at L/4)")
    args = parser.parse_args()

    base = get_preset(args.preset).config
    rows = []
    for name, model in parse_models(args.models, base["model"]["max_span"]):
        config = merge(base, {"model": model, "train": {"seed": args.seed}})
        run = RunConfig.from_dict(config)
        out = Path(args.out) / name
        started = time.perf_counter()
        summary = Trainer(run, out, progress=True).fit()
        rows.append((name, summary, time.perf_counter() - started))

    task = RunConfig.from_dict(base).build_task()
    print(f"\ncopy ({args.preset}): K={task.options.symbols}, gap D={task.options.gap} "
          f"(dependency {task.dependency_length} steps), block M={base['model']['block_len']}")
    print("| model | max span L | accuracy | avg memory size | memory / L | train time (s) |")
    print("|---|---|---|---|---|---|")
    for name, summary, seconds in rows:
        print(f"| {name} | {summary['max_span']} | {summary['metrics']['accuracy']:.4f} | "
              f"{summary['avg_memory_size']:.1f} | "
              f"{summary['avg_memory_size'] / summary['max_span']:.3f} | {seconds:.0f} |")
    (Path(args.out) / "table.json").write_text(json.dumps(
        [{"run": n, "summary": s, "seconds": t} for n, s, t in rows], indent=2))


if __name__ == "__main__":
    main()
