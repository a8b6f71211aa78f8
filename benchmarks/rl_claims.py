"""Gather RL test evaluations into one machine-readable record (``docs/results/rl-claims.json``):
per task, one entry per evaluated checkpoint with its success, the memory it attends at the
decision step and on average, its L (a Transformer-XL's window), seed and settings.

Each ``--record`` is ``TEST_JSON:CONFIG_JSON[:LABEL]``: the output of ``expire-span eval --split
test --output TEST_JSON`` and the run's ``config.json`` (seed, task options, RL settings), with an
optional label saying which checkpoint it is and why (e.g. ``best validation``).

    python benchmarks/rl_claims.py --record runs/c/test.json:runs/c/config.json:"update 950" \\
        --out docs/results/rl-claims.json

With ``--append`` the entries already in ``--out`` are kept (an entry recorded again from the
same test file is replaced), so a new run joins the record without the whole list retyped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def claim(test: dict[str, Any], config: dict[str, Any], label: str | None) -> dict[str, Any]:
    """One entry: the test metrics under the names the issue asks for, and the settings."""
    if test.get("split") != "test":
        raise ValueError(f"{test.get('checkpoint')}: not a test-split evaluation")
    if test["task"] != config["task"]:
        raise ValueError(f"{test.get('checkpoint')}: test record of task {test['task']!r} "
                         f"given with a config for {config['task']!r}")
    metrics, model = test["metrics"], config["model"]
    return {
        "model": test["model"],
        "label": label,
        "success": metrics["success_rate"],
        "mean_return": metrics.get("mean_return"),  # Portal's measure: goals per episode
        "memory_at_decision": metrics["memory_at_decision"],
        "avg_memory_size": metrics["memory_size"],
        "mean_episode_length": metrics["mean_length"],
        "max_span": test["max_span"],
        "window": test["max_span"] if test["model"] == "transformer-xl" else None,
        "seed": config["train"]["seed"],
        "step": test["step"],
        "test_episodes": metrics["episodes"],
        "task_options": config["task_options"],
        "settings": {name: model[name] for name in ("alpha", "span_loss", "ramp", "n_layers",
                                                    "d_model", "init_percentage")}
                    | {"curriculum_updates": config["rl"].get("curriculum_updates"),
                       "carry_memory": config["rl"].get("carry_memory")},
    }


def gather(records: list[str]) -> dict[str, list[dict[str, Any]]]:
    by_task: dict[str, list[dict[str, Any]]] = {}
    for item in records:
        test_path, config_path, *label = item.split(":", 2)
        test = json.loads(Path(test_path).read_text())
        config = json.loads(Path(config_path).read_text())
        entry = claim(test, config, label[0] if label else None)
        entry["sources"] = [test_path, config_path]
        by_task.setdefault(test["task"], []).append(entry)
    return by_task


def merged(old: dict[str, list[dict[str, Any]]],
           new: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """``old``'s entries followed by ``new``'s, an old entry dropped where a new one comes from
    the same test file (the same checkpoint evaluated again)."""
    replaced = {entry["sources"][0] for entries in new.values() for entry in entries}
    result = {task: [e for e in entries if e["sources"][0] not in replaced]
              for task, entries in old.items()}
    for task, entries in new.items():
        result.setdefault(task, []).extend(entries)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="append", required=True,
                        metavar="TEST_JSON:CONFIG_JSON[:LABEL]")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--append", action="store_true",
                        help="keep the entries already in --out (one from the same test file is "
                             "replaced)")
    args = parser.parse_args()
    result = gather(args.record)
    if args.append and Path(args.out).exists():
        result = merged(json.loads(Path(args.out).read_text()), result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for task, entries in result.items():
        for e in entries:
            window = f", window {e['window']}" if e["window"] else ""
            print(f"{task}: {e['model']}{window} seed {e['seed']} step {e['step']}: success "
                  f"{e['success']:.3f}, memory at decision {e['memory_at_decision']:.1f}, "
                  f"average {e['avg_memory_size']:.1f} ({e['label'] or ''})")


if __name__ == "__main__":
    main()
