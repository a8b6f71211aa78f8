"""What a trained Expire-Span agent keeps: the span it gives the first observation of each episode
(Corridor's cue, Instruction's instruction) against every other step's (corridor cells,
distractors), acting greedily in fresh test environments with memory carried across episodes, as
evaluation does, and with ``--length-bins`` the success and first-step span of the episodes by
length (does the agent fail the episodes that outlast its cue's span?). Episode starts are also
split by their observation when few distinct ones occur (Corridor's cue colours). Prints one
JSON object per checkpoint (and writes them all to ``--out``).

    OMP_NUM_THREADS=1 python benchmarks/rl_spans.py --checkpoints runs/corridor/checkpoints/best \\
        runs/corridor --steps 3000 --out spans.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from expire_span.analysis.agent_spans import (
    agent_spans,
    mean_spans_by,
    outcomes_by_length,
    start_groups,
)
from expire_span.training import load_checkpoint


def spans_of(path: str, steps: int, envs: int, seed: int, length_bins: list[int] | None) -> dict:
    loaded = load_checkpoint(path)
    spans = agent_spans(loaded.model, loaded.run.build_task(), steps, envs, seed=seed,
                        carry_memory=loaded.run.rl.get("carry_memory", False),
                        greedy_actions=True)
    groups, start_observations = start_groups(spans)
    table = mean_spans_by(spans.spans, groups)
    record = {"checkpoint": path, "step": loaded.step, "task": loaded.run.task,
              "task_options": loaded.run.task_options, "max_span": loaded.run.model["max_span"],
              "env_steps": steps * envs, "spans": table,
              "start_observations": start_observations}
    if length_bins:
        record["by_length"] = outcomes_by_length(spans, length_bins)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="run or checkpoint directories (e.g. OUT/checkpoints/best)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per environment")
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-bins", type=int, nargs="*", default=None, metavar="EDGE",
                        help="episode-length bin edges for the success / first-step span table "
                        "(e.g. 0 130 160 190 300)")
    parser.add_argument("--out", default=None, help="write the records here (JSON)")
    args = parser.parse_args()
    records = []
    for path in args.checkpoints:
        records.append(spans_of(path, args.steps, args.envs, args.seed, args.length_bins))
        print(json.dumps(records[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
