"""Object Collision data: generation speed (vectorised vs step-by-step) and label statistics.

(1) Times the task generating and caching a split the way training does (uint8 memory-mapped
files in a temporary cache folder), for each ``--frames`` / ``--simulation-frames`` pair, and the
step-by-step reference (tests/collision_reference.py: one simulation, one frame, one particle at a
time) on ``--reference-frames`` frames.

(2) For the valid and test splits of a few boards, the label statistics that put an error rate in
context: the share of labelled frames, the error of the best constant answer, and the error of the
rule "answer the quadrant of the latest collision of any pair" with unlimited memory and with only
the last 128 frames (1024 tokens) in view (``--statistics-only``: this part alone).

    python benchmarks/collision_speed.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.collision_reference

from tests.collision_reference import reference_simulation  # noqa: E402

from expire_span.tasks import build_task  # noqa: E402
from expire_span.tasks.object_collision import quadrant  # noqa: E402

BOARDS = {  # name: options (the CPU preset's splits for the small boards)
    "16x16 (paper)": {"valid_frames": 1_000_000, "test_frames": 1_000_000},
    "16x16, simple variant": {"variant": "simple", "valid_frames": 1_000_000,
                              "test_frames": 1_000_000},
    "4x4, 2 colours (object-collision-2colours)": {"grid": 4, "colours": 2, "valid_frames": 20_000,
                                              "test_frames": 50_000, "simulation_frames": 10_000},
    "8x8, simple variant (the earlier CPU preset)": {
        "variant": "simple", "grid": 8, "valid_frames": 20_000, "test_frames": 20_000,
        "simulation_frames": 10_000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--simulation-frames", type=int, nargs="+", default=[1_000, 50_000])
    parser.add_argument("--reference-frames", type=int, default=5_000)
    parser.add_argument("--statistics-only", action="store_true",
                        help="skip the timings, print only the label statistics")
    args = parser.parse_args()
    if not args.statistics_only:
        timings(args)
    print("\n| board | split | labelled frames | best constant error | latest-collision rule "
          "error | same, last 128 frames only |")
    print("|---|---|---|---|---|---|")
    for name, options in BOARDS.items():
        with tempfile.TemporaryDirectory() as cache:
            task = build_task("object-collision", {**options, "cache_dir": cache})
            for split in ("valid", "test"):
                print(f"| {name} | {split} | " + " | ".join(statistics(task, split)) + " |")


def timings(args: argparse.Namespace) -> None:
    print("| generator | frames | seconds | frames / s |")
    print("|---|---|---|---|")
    for frames in args.frames:
        for per_simulation in args.simulation_frames:
            with tempfile.TemporaryDirectory() as cache:
                task = build_task("object-collision", {
                    "valid_frames": frames, "simulation_frames": per_simulation,
                    "cache_dir": cache,
                })
                started = time.perf_counter()
                task.documents("valid")
                seconds = time.perf_counter() - started
            simulations = -(-frames // per_simulation)
            row(f"vectorised, {simulations} simulations x {per_simulation:,} frames", frames,
                seconds)
    started = time.perf_counter()
    reference_simulation(task.options, "valid", 0, args.reference_frames)
    row("step-by-step reference, 1 simulation", args.reference_frames,
        time.perf_counter() - started)


def row(name: str, frames: int, seconds: float) -> None:
    print(f"| {name} | {frames:,} | {seconds:.2f} | {frames / seconds:,.0f} |")


def statistics(task, split: str) -> list[str]:
    documents, grid = task.documents(split), task.options.grid
    width, per_row = task.options.frame_tokens, documents.frames_per_row
    labelled = errors = 0
    errors_window = 0
    counts = np.zeros(5, dtype=np.int64)
    for sim, frames in enumerate(task.simulation_lengths(split)):
        tokens = np.asarray(documents.tokens[sim * per_row * width:][:frames * width])
        tokens = tokens.reshape(frames, width).astype(np.int64)
        labels = np.asarray(documents.labels[sim * per_row:][:frames]).astype(np.int64)
        collided = (tokens[:, 0] == tokens[:, 3]) & (tokens[:, 1] == tokens[:, 4])
        at = np.where(collided, np.arange(frames), -1)
        latest = np.maximum.accumulate(at)  # frame of the latest collision (-1: none yet)
        cell_x, cell_y = tokens[latest, 0], tokens[latest, 1] - grid  # y tokens are y + grid
        answer = np.where(latest >= 0, quadrant(cell_x, cell_y, grid), 1)
        recent = np.where(np.arange(frames) - latest <= 128, answer, 1)
        scored = labels > 0
        labelled += int(scored.sum())
        errors += int((answer != labels)[scored].sum())
        errors_window += int((recent != labels)[scored].sum())
        counts += np.bincount(labels, minlength=5)
    total = int(sum(task.simulation_lengths(split)))
    return [f"{labelled / total:.1%}", f"{1 - counts[1:].max() / labelled:.1%}",
            f"{errors / labelled:.1%}", f"{errors_window / labelled:.1%}"]


if __name__ == "__main__":
    main()
