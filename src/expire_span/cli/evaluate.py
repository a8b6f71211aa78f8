"""``expire-span eval``: re-evaluate a saved run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from expire_span.tasks import SPLITS
from expire_span.training import evaluate_run, load_checkpoint
from expire_span.training.checkpoint import json_safe
from expire_span.training.loop import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expire-span eval",
        description="Evaluate a checkpoint on a split (RL tasks: fresh episodes seeded for it).",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, its checkpoints/ folder, or one checkpoint")
    parser.add_argument("--split", default="valid", choices=SPLITS)
    parser.add_argument("--batches", type=int, help="batches to read; RL tasks: episodes per "
                        "environment (default: the run's eval_batches)")
    parser.add_argument("--batch-size", type=int, help="streams (RL tasks: environments) in "
                        "parallel (default: the run's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
    train = loaded.run.train
    metrics = evaluate_run(
        loaded.model, loaded.run, args.split,
        batch_size=args.batch_size or loaded.run.eval_batch_size,
        batches=args.batches or train.eval_batches, progress=not args.no_progress,
    )
    result = {"checkpoint": str(loaded.path), "step": loaded.step, "split": args.split,
              "task": loaded.run.task, "model": loaded.model.config.memory,
              "max_span": loaded.model.config.max_span, "metrics": metrics}
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0
