"""The runs behind docs/results.md: the four memory policies on every task, one budget per task.

For each task of ``--tasks``, with the task's CPU preset (same model size, data and budget for
every policy), trains Expire-Span, Transformer-XL, Adaptive-Span and the Compressive Transformer at
the preset's maximum span L, then (copy, corridor, object collision, text) a Transformer-XL whose
window equals Expire-Span's measured average memory size. Each training runs in a fresh process,
which reports its peak resident memory. Then each final checkpoint is evaluated on the test split
(sequence tasks: the split read as streams; RL tasks: fresh episodes), its ``metrics.jsonl`` is
copied to ``--record`` (small files, committed with the docs), learning curves go to ``--images``,
and a markdown table per task is printed and written to ``<out>/<task>/results.json``;
``<out>/results.md`` gathers the tables of every task finished so far (separate invocations may run
in parallel).

A run whose ``summary.json`` exists is not trained again, so an interrupted invocation continues
where it stopped, and tasks can be run in separate invocations (``--tasks copy corridor``).

    OMP_NUM_THREADS=1 python benchmarks/results.py --tasks copy corridor --out runs/results
    OMP_NUM_THREADS=1 python benchmarks/results.py --tasks text --text data/kjv.txt
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import shutil
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from expire_span.benchmarking import (  # noqa: E402
    BenchConfig,
    Case,
    batch_ms,
    measure_isolated,
    rss_mb,
)
from expire_span.tasks import is_rl_task  # noqa: E402
from expire_span.training import (  # noqa: E402
    RunConfig,
    evaluate_run,
    get_preset,
    load_checkpoint,
)
from expire_span.training.config import merge  # noqa: E402
from expire_span.training.dispatch import trainer_class  # noqa: E402

PRESETS = {
    "copy": "copy-cpu",
    "corridor": "corridor-cpu",
    "portal": "portal-cpu",
    "instruction": "instruction-cpu",
    "object-collision": "object-collision-cpu",
    "text": "text-cpu",
}
POLICIES = ["expire-span", "transformer-xl", "adaptive-span", "compressive"]
MATCHED = {"copy", "corridor", "object-collision", "text"}
"""Tasks where a Transformer-XL with Expire-Span's memory size is also trained (the comparison
the paper's claims are about, and text; skipped for portal and instruction to save CPU time)."""


def _train_child(config: dict[str, Any], out: str, results: Any) -> None:
    run = RunConfig.from_dict(config)
    resume = (Path(out) / "checkpoints").is_dir()  # an interrupted run continues where it was
    trainer_class(run.task)(run, out, progress=False, resume=resume).fit()
    results.put(rss_mb("VmHWM"))


def train(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train in a fresh process (unless ``out`` holds a finished run; an interrupted one is
    resumed from its newest intact checkpoint); return its summary, with
    the peak resident memory of the training process (recorded in ``peak_rss_mb.json``)."""
    peak_file = out / "peak_rss_mb.json"
    if not (out / "summary.json").exists():
        print(f"training {out} ...", flush=True)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        process = context.Process(target=_train_child, args=(config, str(out), results))
        process.start()
        peak = None
        while peak is None and (process.is_alive() or not results.empty()):
            try:  # a child that dies (bad config, killed) puts nothing: do not wait forever
                peak = results.get(timeout=5)
            except queue.Empty:
                pass
        process.join()
        if process.exitcode != 0 or peak is None:
            raise SystemExit(f"training {out} failed (exit code {process.exitcode})")
        peak_file.write_text(json.dumps(peak))
    summary = json.loads((out / "summary.json").read_text())
    summary["peak_rss_mb"] = json.loads(peak_file.read_text()) if peak_file.exists() else None
    return summary


def records(run_dir: Path, split: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def ms_per_step(run_dir: Path, run: RunConfig) -> float:
    """Median wall time of a training step, from the throughput logged during training
    (evaluations excluded)."""
    positions = run.train.batch_size * run.seq_len
    rates = [r.get("tokens_per_s") or r.get("env_steps_per_s") for r in records(run_dir, "train")]
    return 1000 * positions / statistics.median(rate for rate in rates if rate)


def training_cost(run_dir: Path, run: RunConfig, name: str) -> dict[str, float]:
    """Time and peak memory of a training step of the trained model on its task's data, with its
    learned memory (``expire-span bench --checkpoint``: a fresh process, memory warmed up by
    reading L + R tokens, the median of 5 steps of one block x ``batch_size`` rows, CPU time on the
    CPU). RL agents are not measured this way (their steps are environment steps)."""
    if is_rl_task(run.task):
        return {}
    bench = BenchConfig(batch_size=run.train.batch_size, steps=5, warmup_steps=2, device="cpu")
    case = Case(name, run.model["memory"], run.model["max_span"])
    record = measure_isolated(bench, case, checkpoint=str(run_dir))
    if "error" in record:
        raise SystemExit(f"measuring {run_dir} failed: {record['error']}")
    return {"block_ms": batch_ms(record), "peak_increase_mb": record["peak_increase_mb"]}


def test_metrics(run_dir: Path) -> dict[str, float]:
    """The final checkpoint on the test split, as ``expire-span eval --split test`` reports it."""
    loaded = load_checkpoint(run_dir)
    return evaluate_run(loaded.model, loaded.run, "test", loaded.run.eval_batch_size,
                        loaded.run.train.eval_batches)


def plot(task: str, metric: str, runs: list[tuple[str, Path]], path: Path) -> None:
    """Learning curves against training steps: the task metric on the training batches (lines)
    and at each validation (dots), and the average memory size on the training batches."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, run_dir in runs:
        train = [r for r in records(run_dir, "train") if metric in r]
        valid = [r for r in records(run_dir, "valid") if metric in r]
        line, = left.plot([r["step"] for r in train], [r[metric] for r in train], label=label,
                          linewidth=1)
        left.plot([r["step"] for r in valid], [r[metric] for r in valid], "o",
                  color=line.get_color())
        right.plot([r["step"] for r in train], [r["memory_size"] for r in train], label=label,
                   linewidth=1)
    left.set(xlabel="training step", ylabel=metric,
             title=f"{task}: {metric} (lines: training, dots: validation)")
    right.set(xlabel="training step", ylabel="earlier steps attended per query",
              title=f"{task}: average memory size (training)")
    left.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_task(task: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    base = merge(get_preset(PRESETS[task]).config, {"train": {"seed": args.seed}})
    if task == "text":
        base = merge(base, {"task_options": {"data": args.text}})
    out = Path(args.out) / task
    variants = [(policy, {"memory": policy}) for policy in POLICIES]
    summaries = {name: train(merge(base, {"model": model}), out / name)
                 for name, model in variants}
    if task in MATCHED:
        window = max(base["model"]["block_len"],
                     round(summaries["expire-span"]["avg_memory_size"]))
        name = f"transformer-xl-{window}"
        summaries[name] = train(
            merge(base, {"model": {"memory": "transformer-xl", "max_span": window}}), out / name)

    metric = summaries["expire-span"]["primary_metric"]
    plot(task, metric, [(n, out / n) for n in summaries], Path(args.images) / f"results-{task}.png")
    rows = []
    for name, summary in summaries.items():
        run_dir = out / name
        run = RunConfig.from_dict(summary["config"])
        record_dir = Path(args.record) / task
        record_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "metrics.jsonl", record_dir / f"{name}.jsonl")
        test = test_metrics(run_dir)
        rows.append({
            "task": task, "run": name, "model": summary["model"], "max_span": summary["max_span"],
            "metric": metric, "test": test, "valid": summary["metrics"],
            "avg_memory_size": summary["avg_memory_size"],
            "ms_per_step": ms_per_step(run_dir, run), "peak_rss_mb": summary["peak_rss_mb"],
            "parameters": summary["parameters"], "steps": summary["steps"],
            **training_cost(run_dir, run, name),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | model | L (window) | test metric | valid metric | avg memory size "
             "| memory / L | ms per step (wall, in training) | peak RSS of training (MB) "
             "| ms per block (CPU, trained) | peak increase per block (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        metric = row["metric"]
        cost = (f"{row['block_ms']:.1f} | {row['peak_increase_mb']:.0f}"
                if "block_ms" in row else "- | -")
        lines.append(
            f"| {row['task']} | {row['model']} | {row['max_span']} | "
            f"{metric} {row['test'][metric]:.3f} | {row['valid'][metric]:.3f} | "
            f"{row['avg_memory_size']:.1f} | {row['avg_memory_size'] / row['max_span']:.3f} | "
            f"{row['ms_per_step']:.0f} | {row['peak_rss_mb']:.0f} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--record", default="docs/results",
                        help="where each run's metrics.jsonl is copied")
    parser.add_argument("--images", default="docs/images", help="where learning curves go")
    parser.add_argument("--text", nargs="+", default=["data/kjv.txt"],
                        help="text files for the text task (the King James Bible by default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    for task in args.tasks:
        rows = run_task(task, args)
        (out / task / "results.json").write_text(json.dumps(rows, indent=2))
        print("\n" + markdown(rows) + "\n", flush=True)
    done = [out / task / "results.json" for task in PRESETS]
    (out / "results.md").write_text("\n\n".join(
        markdown(json.loads(path.read_text())) for path in done if path.exists()) + "\n")


if __name__ == "__main__":
    main()
