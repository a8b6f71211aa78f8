"""How far back Object Collision's answers lie: what a window of L tokens can know.

For a board (a preset's task options, plus ``--set name=value`` overrides), reads the valid and
test splits and, for every labelled frame, the distance in tokens from the query (the frame's last
token) back to the first token of the frame holding the queried pair's last collision, i.e. the
window a model needs to see that collision. Prints the labelled share, the error of the best
constant answer, the error of "the quadrant of the latest collision of any pair" (unlimited
memory), the distance's quantiles, and for each window ``--windows`` the share of answers beyond
it and the error of an oracle that answers right within the window and with the best constant
beyond it (a lower bound for a model with that window).

With ``--checkpoints``, it evaluates trained models instead (each on its own run's board): every
test simulation read as one stream from an empty memory, the answer at each labelled frame's last
token, and the error by the distance of the answer (``--windows`` are the bin edges) beside the
oracle's, which shows how far back a model really reads, whatever its overall error; for an
Expire-Span model also the median and 90th percentile of the spans it gives the tokens of the
split's first simulation, per layer (how far each layer's memory grew).

    python benchmarks/collision_memory.py --preset object-collision-cpu
    python benchmarks/collision_memory.py --preset object-collision-16k --set test_frames=1000000
    python benchmarks/collision_memory.py --checkpoints runs/oc-a runs/oc-b --windows 64 256 1024 \
        --splits test --out by-distance.json
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expire_span.analysis.spans import token_spans
from expire_span.tasks import build_task
from expire_span.tasks.object_collision import ObjectCollisionTask, quadrant
from expire_span.training import get_preset, load_checkpoint


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


def model_answers(model: Any, task: ObjectCollisionTask, split: str,
                  chunk: int = 4096) -> np.ndarray:
    """The model's answer (argmax of the logits at the frame's last token) at every labelled
    frame, in :func:`answer_distances`'s order; each simulation is read as one stream from an
    empty memory, ``chunk`` tokens per call (the model splits calls into its blocks)."""
    documents, width = task.documents(split), task.options.frame_tokens
    answers = []
    with torch.no_grad():
        for sim, frames in enumerate(task.simulation_lengths(split)):
            start = sim * documents.frames_per_row
            tokens = np.asarray(documents.tokens[start * width:(start + frames) * width])
            labels = np.asarray(documents.labels[start:start + frames])
            stream = torch.as_tensor(tokens.astype(np.int64)).unsqueeze(0)
            memory, last_tokens = None, []
            for part in stream.split(chunk, dim=1):
                out = model(part, memory)
                memory = out.memory
                last_tokens.append(out.logits[0].argmax(-1))
            by_frame = torch.cat(last_tokens).view(frames, width)[:, -1].cpu().numpy()
            answers.append(by_frame[labels > 0])
    return np.concatenate(answers)


def span_quantiles(model: Any, task: ObjectCollisionTask, split: str,
                   tokens: int = 8192) -> list[dict[str, float]]:
    """Per layer: the median and 90th percentile of the spans of the first ``tokens`` tokens of
    the split's first simulation (read from an empty memory)."""
    documents, width = task.documents(split), task.options.frame_tokens
    frames = min(task.simulation_lengths(split)[0], tokens // width)
    stream = torch.as_tensor(np.asarray(documents.tokens[:frames * width]).astype(np.int64))
    spans = token_spans(model, stream)  # [layers, T]
    return [{"layer": layer, "median": float(row.median()), "p90": float(row.quantile(0.9))}
            for layer, row in enumerate(spans)]


def errors_by_distance(label: np.ndarray, distance: np.ndarray, answer: np.ndarray,
                       edges: list[int]) -> list[dict[str, Any]]:
    """Per distance bin ``(edges[i-1], edges[i]]`` (the first from 0, the last open): the share
    of answers in it, the model's error there and the error of the best constant there."""
    counts = np.bincount(label, minlength=5)[1:]
    best = int(np.argmax(counts)) + 1
    bounds = [0, *edges, None]
    rows = []
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        inside = (distance > low) & (True if high is None else distance <= high)
        n = int(inside.sum())
        rows.append({"from": low, "to": high, "share": n / len(label),
                     "error": float(np.mean(answer[inside] != label[inside])) if n else None,
                     "constant_error": float(np.mean(label[inside] != best)) if n else None})
    return rows


def evaluate_checkpoints(paths: list[str], splits: list[str], edges: list[int]
                         ) -> list[dict[str, Any]]:
    """:func:`errors_by_distance` of each trained model on each split, printed as a table."""
    records = []
    header = ["run", "split", "error"] + [
        f"({low}, {high if high is not None else 'inf'}]: share, error / constant"
        for low, high in zip([0, *edges], [*edges, None], strict=True)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in paths:
        loaded = load_checkpoint(path)
        model = loaded.model.eval()
        task = loaded.run.build_task()
        for split in splits:
            stats = answer_distances(task, split)
            answer = model_answers(model, task, split)
            rows = errors_by_distance(stats["label"], stats["distance"], answer, edges)
            error = float(np.mean(answer != stats["label"]))
            record = {"run": path, "model": loaded.run.model["memory"],
                      "max_span": loaded.run.model["max_span"], "split": split,
                      "error": error, "bins": rows}
            cells = [path, split, f"{error:.1%}"] + [
                f"{r['share']:.0%}, {r['error']:.1%} / {r['constant_error']:.1%}"
                if r["error"] is not None else "-" for r in rows]
            print("| " + " | ".join(cells) + " |", flush=True)
            if record["model"] == "expire-span":
                record["spans"] = span_quantiles(model, task, split)
            records.append(record)
    for record in records:
        if "spans" in record:
            print(f"{record['run']} ({record['split']}): spans by layer, median / p90: "
                  + ", ".join(f"{q['median']:.0f} / {q['p90']:.0f}" for q in record["spans"]))
    return records


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
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="RUN",
                        help="evaluate these trained runs by answer distance (their own boards)")
    parser.add_argument("--out", default=None, help="with --checkpoints: write the JSON here")
    args = parser.parse_args()
    if args.checkpoints:
        records = evaluate_checkpoints(args.checkpoints, args.splits, args.windows)
        if args.out:
            Path(args.out).write_text(json.dumps(records, indent=2) + "\n")
        return
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
