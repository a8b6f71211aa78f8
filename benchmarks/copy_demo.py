"""The README's copy demo: Expire-Span vs Transformer-XL at the same L and at a quarter of L.

Runs three trainings of the ``copy-cpu`` preset (or ``--preset``) one after the other and prints a
markdown table of accuracy, average memory size and wall time.

    python benchmarks/copy_demo.py --out runs/copy-demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from expire_span.training import RunConfig, Trainer, get_preset
from expire_span.training.config import merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="copy-cpu")
    parser.add_argument("--out", default="runs/copy-demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = get_preset(args.preset).config
    span = base["model"]["max_span"]
    runs = [
        ("expire-span", {"memory": "expire-span"}),
        ("transformer-xl", {"memory": "transformer-xl"}),
        (f"transformer-xl-{span // 4}", {"memory": "transformer-xl", "max_span": span // 4}),
    ]
    rows = []
    for name, model in runs:
        config = merge(base, {"model": model, "train": {"seed": args.seed}})
        run = RunConfig.from_dict(config)
        out = Path(args.out) / name
        started = time.perf_counter()
        summary = Trainer(run, out, progress=True).fit()
        rows.append((name, summary, time.perf_counter() - started))

    task = RunConfig.from_dict(base).build_task()
    print(f"\ncopy: K={task.options.symbols}, gap D={task.options.gap} "
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
