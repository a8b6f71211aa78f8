"""How far back Object Collision's answers lie: what a window of L tokens can know.

For a board (a preset's task options, plus ``--set name=value`` overrides), reads the valid and
test splits and, for every labelled frame, the distance in tokens from the query (the frame's last
token) back to the first token of the frame holding the queried pair's last collision, i.e. the
window a model needs to see that collision. Prints the labelled share, the error of the best
constant answer, the error of "the quadrant of the latest collision of any pair" (unlimited
memory), the distance's quantiles, and for each window ``--windows`` the share of answers beyond
it and the error of an oracle that answers right within the window and with the best constant
beyond it (a lower bound for a model with that window).

    python benchmarks/collision_memory.py --preset object-collision-cpu
    python benchmarks/collision_memory.py --preset object-collision-16k --set test_frames=1000000
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

import numpy as np

from expire_span.tasks import build_task
from expire_span.tasks.object_collision import ObjectCollisionTask, quadrant
from expire_span.training import get_preset


def answer_distances(task: ObjectCollisionTask, split: str) -> dict[str, np.ndarray]:
    """Per labelled frame: ``label``, ``distance`` (tokens back to the first token of the
    frame of the queried pair's last collision) and ``latest`` (the quadrant of the latest
    collision of any pair). Two-particle boards only."""
    opts = task.options
    if opts.particles != 2:
        raise ValueError("collision_memory: only 2-particle boards are supported")
    documents, width, grid = task.documents(split), opts.frame_tokens, opts.grid
    labels_out, distance_out, latest_out = [], [], []
    for sim, frames in enumerate(task.simulation_lengths(split)):
        start = sim * documents.frames_per_row
        tokens = np.asarray(documents.tokens[start * width:(start + frames) * width])
        tokens = tokens.reshape(frames, width).astype(np.int64)
        labels = np.asarray(documents.labels[start:start + frames]).astype(np.int64)
        x0, y0, c0, x1, y1, c1, qa, qb = tokens.T
        collided = (x0 == x1) & (y0 == y1)
        colours = opts.colours
        pair = (c0 - 2 * grid) * colours + (c1 - 2 * grid)
        if not opts.ordered_pairs:
            low, high = np.minimum(c0, c1) - 2 * grid, np.maximum(c0, c1) - 2 * grid
            pair = low * colours + high
        asked = (qa - 2 * grid - colours) * colours + (qb - 2 * grid - colours)
        last = np.full(colours * colours, -1)
        latest = -1
        frame_of = np.full(frames, -1)
        latest_of = np.full(frames, -1)
        for t in np.flatnonzero(collided | (labels > 0)):
            if collided[t]:
                last[pair[t]] = t
                latest = t
            frame_of[t], latest_of[t] = last[asked[t]], latest
        scored = labels > 0
        t = np.flatnonzero(scored)
        labels_out.append(labels[scored])
        distance_out.append(width * (t - frame_of[scored]) + width - 1)
        at = latest_of[scored]
        latest_out.append(quadrant((tokens[at, 0]), tokens[at, 1] - grid, grid))
    return {"label": np.concatenate(labels_out), "distance": np.concatenate(distance_out),
            "latest": np.concatenate(latest_out)}


def parse_set(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="object-collision-cpu")
    parser.add_argument("--set", type=parse_set, action="append", default=[],
                        metavar="NAME=VALUE", help="a task option (repeatable)")
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--splits", nargs="+", default=["valid", "test"])
    args = parser.parse_args()
    config = get_preset(args.preset).config
    if config["task"] != "object-collision":
        parser.error(f"preset {args.preset!r} is not an object-collision preset")
    options = {**config.get("task_options", {}), **dict(args.set)}
    task = build_task("object-collision", options)
    print(f"options: {options}")
    header = ["split", "labelled", "constant error", "latest-collision rule error",
              "distance p25 / p50 / p75 / p90 (tokens)"]
    header += [f"beyond {w} / oracle error" for w in args.windows]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for split in args.splits:
        stats = answer_distances(task, split)
        label, distance = stats["label"], stats["distance"]
        frames = int(sum(task.simulation_lengths(split)))
        counts = np.bincount(label, minlength=5)[1:]
        best = int(np.argmax(counts)) + 1
        constant = 1 - counts.max() / len(label)
        cells = [split, f"{len(label) / frames:.1%}", f"{constant:.1%}",
                 f"{np.mean(stats['latest'] != label):.1%}",
                 " / ".join(f"{q:.0f}" for q in np.percentile(distance, [25, 50, 75, 90]))]
        for window in args.windows:
            beyond = distance > window
            oracle = np.mean(beyond & (label != best))
            cells.append(f"{beyond.mean():.1%} / {oracle:.1%}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
