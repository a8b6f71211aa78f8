"""The RL comparison of docs/rl.md: Expire-Span against Transformer-XL on Corridor, Portal and
Instruction, with learning curves.

For each task, trains (one after the other, with the task's ``<task>-<suffix>`` preset: ``cpu``,
or ``long`` for the stream presets where forgetting is exercised):

1. Expire-Span;
2. Transformer-XL whose window equals Expire-Span's measured memory at the decision step
   (``memory_at_decision``; the average memory size where a task has none);
3. Transformer-XL at each window of ``--windows`` (e.g. the smallest that can solve the task);
4. Transformer-XL with the preset's full window L (a reference: the task is solvable with enough
   memory in the same budget), unless ``--no-reference``;
5. Adaptive-Span (starting at Expire-Span's span) with ``--adaptive``.

then evaluates each final checkpoint on the test split (fresh seeds; greedy and sampled actions),
prints a markdown table, and draws the learning curves (training success rate and average memory
size per update) into ``<docs>/rl-<task>.png``. A run whose ``summary.json`` already exists is not
trained again, so an interrupted benchmark continues where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/rl_demo.py --tasks corridor portal instruction
    OMP_NUM_THREADS=1 python benchmarks/rl_demo.py --tasks corridor --suffix long \
        --windows 201 --adaptive --no-reference --seed 0 --out runs/rl-long-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from expire_span.training import (  # noqa: E402
    RLTrainer,
    RunConfig,
    get_preset,
    load_checkpoint,
)
from expire_span.training.config import merge  # noqa: E402
from expire_span.training.rollout import evaluate_agent  # noqa: E402


def train(config: dict, out: Path) -> dict:
    """Train (unless ``out`` already holds a finished run); return the run's summary."""
    if not (out / "summary.json").exists():
        RLTrainer(RunConfig.from_dict(config), out, progress=True).fit()
    return json.loads((out / "summary.json").read_text())


def test_metrics(out: Path, episodes: int) -> dict[str, dict]:
    """Test-split metrics of a run's final checkpoint, greedy and sampled."""
    loaded = load_checkpoint(out)
    task, train_cfg = loaded.run.build_task(), loaded.run.train
    carry = loaded.run.rl_config.carry_memory  # evaluated as trained: a stream, or reset episodes
    return {
        mode: evaluate_agent(loaded.model, task, "test", train_cfg.batch_size, episodes,
                             train_cfg.seed, greedy_actions=mode == "greedy", carry_memory=carry)
        for mode in ("greedy", "sampled")
    }


def curves(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


def plot(task: str, runs: list[tuple[str, Path]], path: Path) -> None:
    figure, (success, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, run_dir in runs:
        records = curves(run_dir)
        steps = [r["step"] for r in records]
        success.plot(steps, [r["success_rate"] for r in records], label=label)
        memory.plot(steps, [r["memory_size"] for r in records], label=label)
    success.set(xlabel="update", ylabel="training success rate", title=f"{task}: success",
                ylim=(-0.02, 1.02))
    memory.set(xlabel="update", ylabel="earlier steps attended per query",
               title=f"{task}: average memory size")
    success.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["corridor", "portal", "instruction"])
    parser.add_argument("--out", default="runs/rl-demo")
    parser.add_argument("--docs", default="docs/images", help="where the learning-curve PNGs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-episodes", type=int, default=8,
                        help="test episodes per environment for the table")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the full-window Transformer-XL")
    parser.add_argument("--suffix", default="cpu", help="preset <task>-<suffix>: cpu or long")
    parser.add_argument("--windows", nargs="*", type=int, default=[],
                        help="more Transformer-XL windows to train")
    parser.add_argument("--adaptive", action="store_true", help="also train Adaptive-Span")
    args = parser.parse_args()

    rows = []
    for task in args.tasks:
        base = merge(get_preset(f"{task}-{args.suffix}").config, {"train": {"seed": args.seed}})
        span = base["model"]["max_span"]
        out = Path(args.out) / task
        expire = train(merge(base, {"model": {"memory": "expire-span"}}), out / "expire-span")
        decision = expire["memory_at_decision"]
        measured = decision if decision is not None else expire["avg_memory_size"]
        window = max(base["model"]["block_len"], round(measured))
        runs = [("expire-span", expire)]
        variants = [(f"transformer-xl-{w}", w) for w in [window, *args.windows]]
        if not args.no_reference:
            variants.append((f"transformer-xl-{span}", span))
        for name, max_span in dict(variants).items():  # a window listed twice trains once
            config = merge(base, {"model": {"memory": "transformer-xl", "max_span": max_span}})
            runs.append((name, train(config, out / name)))
        if args.adaptive:
            config = merge(base, {"model": {"memory": "adaptive-span"}})
            runs.append(("adaptive-span", train(config, out / "adaptive-span")))
        plot(task, [(name, out / name) for name, _ in runs], Path(args.docs) / f"rl-{task}.png")
        for name, summary in runs:
            rows.append({"task": task, "run": name, "model": summary["model"],
                         "max_span": summary["max_span"], "valid": summary["metrics"],
                         "test": test_metrics(out / name, args.test_episodes),
                         "seconds": summary["train_seconds_this_session"]})

    print("\n| task | model | window / max span L | test success greedy / sampled | "
          "test return greedy / sampled | avg memory size | memory at decision | "
          "train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        greedy, sampled = row["test"]["greedy"], row["test"]["sampled"]
        print(f"| {row['task']} | {row['model']} | {row['max_span']} | "
              f"{greedy['success_rate']:.3f} / {sampled['success_rate']:.3f} | "
              f"{greedy['mean_return']:.2f} / {sampled['mean_return']:.2f} | "
              f"{sampled['memory_size']:.1f} | {sampled['memory_at_decision']:.1f} | "
              f"{row['seconds']:.0f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
