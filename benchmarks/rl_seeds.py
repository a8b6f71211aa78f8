"""How reliably a preset trains: the greedy validation success of every periodic evaluation, for
several seeds, optionally with overrides (the stability figures of docs/rl.md).

    OMP_NUM_THREADS=1 python benchmarks/rl_seeds.py --preset corridor-test --seeds 5 \\
        --set train.steps=60 train.eval_every=20 train.adam_eps=1e-8
"""

from __future__ import annotations

import argparse
import json
import tempfile

from expire_span.training import RLTrainer, RunConfig, get_preset
from expire_span.training.config import merge


def override(text: str) -> dict:
    """``section.field=value`` (value parsed as JSON when it can be) as a nested dict."""
    key, _, value = text.partition("=")
    section, _, field = key.partition(".")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return {section: {field: parsed}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="corridor-test")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()
    config = get_preset(args.preset).config
    for item in args.set:
        config = merge(config, override(item))
    solved = total = 0
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as out:
            run = RunConfig.from_dict(merge(config, {"train": {"seed": seed}}))
            RLTrainer(run, out, progress=False).fit()
            lines = open(f"{out}/metrics.jsonl").read().splitlines()
        evals = [r["success_rate"] for r in map(json.loads, lines) if r["split"] == "valid"]
        solved += sum(value >= 0.9 for value in evals)
        total += len(evals)
        print(f"seed {seed}: " + " ".join(f"{value:.2f}" for value in evals))
    print(f"{args.preset} {' '.join(args.set)}: {solved}/{total} evaluations >= 0.9")


if __name__ == "__main__":
    main()
