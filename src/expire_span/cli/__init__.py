"""The ``expire-span`` command: one module per sub-command."""

from __future__ import annotations

import sys
from collections.abc import Callable

from expire_span.training import CheckpointError, TrainingDiverged, TrainingInterrupted

USAGE = """usage: expire-span COMMAND [options]

commands:
  train     train a model on a task (expire-span train --help)
  eval      evaluate a saved run on a split
  presets   list the named hyperparameter sets
  bench     time and memory of memory policies against the maximum span
  generate  continue a prompt with a trained text model (streams the text)
  spans     the expire-span of every character of a text (PNG heat map and HTML)
  plot      training curves of a run
"""


def _commands() -> dict[str, Callable[[list[str]], int]]:
    from expire_span.cli import bench, evaluate, generate, plot, presets, spans, train

    return {"train": train.run, "eval": evaluate.run, "presets": presets.run, "bench": bench.run,
            "spans": spans.run, "plot": plot.run, "generate": generate.run}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"expire-span: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except TrainingInterrupted as stop:
        print(f"expire-span: {stop}", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        print(f"expire-span: training diverged: {error}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError) as error:
        print(f"expire-span: error: {error}", file=sys.stderr)
        return 1
