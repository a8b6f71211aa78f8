"""``expire-span train``: resolve the configuration, then train."""

from __future__ import annotations

import argparse
import time
from typing import Any

from expire_span.cli.flags import add_dataclass_flags, given_sections
from expire_span.config import ModelConfig
from expire_span.tasks import available_tasks, is_rl_task, task_class
from expire_span.training import (
    DEFAULT_PRESETS,
    RLConfig,
    RunConfig,
    TrainConfig,
    get_preset,
    trainer_class,
)
from expire_span.training.checkpoint import CheckpointError, branch_checkpoint
from expire_span.training.config import load_config_file, merge
from expire_span.training.distributed import Group, process_group


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=available_tasks(), help="task to train on")
    parser.add_argument("--preset", help="named hyperparameters (see `expire-span presets`); "
                        "default: the task's CPU preset")
    parser.add_argument("--config", help="JSON or TOML file with sections task_options, model, "
                        "train, rl (applied over the preset)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<model>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--branch-from", metavar="CHECKPOINT",
                        help="start the new run --out from this checkpoint (or run's newest) with "
                        "its weights, optimizer, random states and memory, changing only loss "
                        "settings (--alpha, --span-loss, --ramp, --noisy, "
                        "--adapt-span-loss, --compress-loss) and training flags: an ablation "
                        "from a common point")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser(task: str, prog: str = "expire-span train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a memory Transformer. Values come from the task's default preset (or "
        "--preset), then --config, then the flags below (the defaults they show are the "
        "library's, which presets override).",
    )
    _common_flags(parser)
    add_dataclass_flags(parser.add_argument_group("model"), ModelConfig, "model",
                        exclude=frozenset({"vocab_size"}), aliases={"memory": ["--model"]})
    add_dataclass_flags(parser.add_argument_group("training"), TrainConfig, "train")
    add_dataclass_flags(parser.add_argument_group(f"task {task}"), task_class(task).Options,
                        "task_options")
    if is_rl_task(task):
        add_dataclass_flags(parser.add_argument_group("reinforcement learning (PPO)"), RLConfig,
                            "rl")
    return parser


def resolve_config(args: argparse.Namespace, given: dict[str, dict[str, Any]]) -> RunConfig:
    """Defaults < preset < config file < flags."""
    file_config = load_config_file(args.config) if args.config else {}
    task = args.task or file_config.get("task")
    preset_name = args.preset
    if preset_name is None:
        preset_name = DEFAULT_PRESETS.get(task or "copy")
    layers: dict[str, Any] = {}
    if preset_name is not None:
        preset = get_preset(preset_name).config
        if task is not None and preset.get("task", task) != task:
            raise ValueError(f"preset {preset_name!r} is for task {preset['task']!r}, not {task!r}")
        layers = dict(preset)
    layers = merge(layers, file_config)
    layers = merge(layers, {k: v for k, v in given.items() if k != "task"})
    layers["task"] = task or layers.get("task", "copy")
    return RunConfig.from_dict(layers)


def _task_for_parser(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    _common_flags(pre)
    known, _ = pre.parse_known_args(argv)
    if known.task:
        return known.task
    if known.branch_from:
        return _saved_task(known.branch_from)
    if known.resume and known.out:
        return _saved_task(known.out)
    if known.config:
        return load_config_file(known.config).get("task", "copy")
    if known.preset:
        return get_preset(known.preset).config.get("task", "copy")
    return "copy"


def _saved_task(out: str) -> str:
    from expire_span.training.checkpoint import load_latest_valid

    return load_latest_valid(out, training_state=False)[0].run.task


def run(argv: list[str]) -> int:
    """Train in this process, or, under torchrun, in each of its processes (see
    :mod:`expire_span.training.distributed`)."""
    task = _task_for_parser(argv)
    parser = build_parser(task)
    args = parser.parse_args(argv)
    given = given_sections(args)
    with process_group() as group:
        summary = _train(task, args, given, group)
    if summary is not None:
        print(summary_line(summary))
    return 0


def _given_fields(given: dict[str, dict[str, Any]], sections: tuple[str, ...]) -> list[str]:
    """``section.field`` for every flag given in ``sections`` (for refusing them), sorted."""
    return sorted(f"{s}.{k}" for s in sections for k in given.get(s, {}))


def _train(task: str, args: argparse.Namespace, given: dict[str, dict[str, Any]],
           group: Group) -> dict[str, Any] | None:
    progress = not args.no_progress
    if args.branch_from:
        if args.resume or args.preset or args.config or not args.out:
            raise ValueError("--branch-from needs --out (a new run directory) and takes neither "
                             "--resume, --preset nor --config")
        fixed = _given_fields(given, ("task_options", "rl"))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} in a branch")
        error = None
        if group.is_main:  # one process writes the branch; all of them learn whether it failed
            try:
                branch_checkpoint(args.branch_from, args.out, given.get("model", {}))
            except (ValueError, CheckpointError) as failure:
                error = str(failure)
        error = group.broadcast(error)
        if error is not None:
            raise ValueError(error)
        trainer = trainer_class(task)(None, args.out, resume=True,
                                      resume_overrides=given.get("train", {}), progress=progress)
    elif args.resume:
        if not args.out:
            raise ValueError("--resume needs --out, the run directory to continue")
        fixed = _given_fields(given, ("model", "task_options", "rl"))
        if fixed or args.preset or args.config:
            changed = fixed + [f for f in ("--preset", "--config") if getattr(args, f[2:])]
            raise ValueError(f"cannot change {', '.join(changed)} when resuming a run")
        trainer = trainer_class(task)(None, args.out, resume=True,
                                      resume_overrides=given.get("train", {}), progress=progress)
    else:
        config = resolve_config(args, given)
        memory = config.model.get("memory", ModelConfig.memory)
        foreign = [f"--{k.replace('_', '-')}" for k in ("mem_len", "cmem_len")
                   if k in given.get("model", {})]
        if foreign and memory != "compressive":
            raise ValueError(f"{', '.join(foreign)} size Compressive's memory; {memory} does not "
                             "use them (Transformer-XL's window is --max-span)")
        # every process writes to rank 0's directory (their clocks may disagree on its name)
        out = group.broadcast(
            args.out or f"runs/{config.task}-{memory}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        trainer = trainer_class(config.task)(config, out, progress=progress)
        if group.is_main:
            processes = f" in {group.world_size} processes" if group.distributed else ""
            print(f"training {memory} on {config.task}{processes}; writing to {out}")
    return trainer.fit()


def summary_line(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    primary = summary["primary_metric"]
    return (
        f"{summary['task']} / {summary['model']} after {summary['steps']} steps: "
        f"{primary} {metrics[primary]:.4f}, average memory size "
        f"{summary['avg_memory_size']:.1f} of max span L={summary['max_span']} "
        f"(cache {summary['cache_size']:.1f})"
    )
