"""Named hyperparameter sets: small CPU ones for demos and tests, the paper's for GPUs.

A preset is a partial run configuration (sections ``task``, ``task_options``, ``model``,
``train``). Without ``--preset`` a task's default preset (``DEFAULT_PRESETS``) is applied, so that
``expire-span train --task copy`` does something sensible on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any]


_PRESETS = [
    Preset(
        "copy-cpu",
        "copy, K=8 symbols after a gap of 200 (6x the block), L=512: a few minutes on 2 CPU cores",
        {
            "task": "copy",
            "task_options": {"symbols": 8, "gap": 200, "alphabet": 16},
            "model": {
                "d_model": 64, "n_layers": 2, "n_heads": 4, "block_len": 32, "max_span": 512,
                "ramp": 16, "alpha": 1e-4, "init_percentage": 0.6, "pre_div": 8.0,
            },
            "train": {
                "steps": 600, "batch_size": 32, "seq_len": 128, "lr": 2e-3, "warmup": 50,
                "eval_every": 200, "eval_batches": 10, "log_every": 20, "checkpoint_every": 200,
            },
        },
    ),
    Preset(
        "copy-test",
        "copy, K=4 symbols after a gap of 40 (5x the block), L=128: under a minute, for tests",
        {
            "task": "copy",
            "task_options": {"symbols": 4, "gap": 40, "alphabet": 8, "eval_warmup": 256},
            "model": {
                "d_model": 64, "n_layers": 2, "n_heads": 4, "block_len": 8, "max_span": 128,
                "ramp": 8, "alpha": 1e-4, "init_percentage": 0.6, "pre_div": 8.0,
            },
            "train": {
                "steps": 300, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup": 20,
                "eval_every": 100, "eval_batches": 5, "log_every": 20, "checkpoint_every": 100,
            },
        },
    ),
    Preset(
        "copy-superlong",
        "super-long copy: gap of 16384, L=32768, M=512 (a GPU preset)",
        {
            "task": "copy",
            "task_options": {"symbols": 8, "gap": 16384, "alphabet": 16, "eval_warmup": 65536},
            "model": {
                "d_model": 256, "n_layers": 4, "n_heads": 8, "block_len": 512,
                "max_span": 32768, "ramp": 128, "alpha": 1e-6, "init_percentage": 0.6,
                "pre_div": 64.0,
            },
            "train": {
                "steps": 20000, "batch_size": 32, "seq_len": 2048, "lr": 5e-4, "warmup": 1000,
                "eval_every": 1000, "eval_batches": 20, "log_every": 50,
                "checkpoint_every": 1000,
            },
        },
    ),
]


def _rl_preset(name: str, description: str, task: str, task_options: dict[str, Any],
               model: dict[str, Any], train: dict[str, Any]) -> Preset:
    """A reinforcement-learning preset over what the CPU RL presets share: a tiny agent (d=32,
    2 heads, one step per call, so the block length only bounds L), spans starting at 0.6 L (longer
    than any episode: see docs/rl.md), PPO with the default ``rl`` settings and a cosine decay."""
    shared_model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "block_len": 4, "ramp": 8,
                    "alpha": 1e-3, "init_percentage": 0.6, "pre_div": 8.0}
    shared_train = {"steps": 300, "batch_size": 32, "seq_len": 32, "lr": 5e-4, "warmup": 0,
                    "schedule": "cosine", "adam_eps": 1e-5, "eval_every": 25, "eval_batches": 4,
                    "log_every": 10, "checkpoint_every": 50}
    return Preset(name, description, {
        "task": task, "task_options": task_options, "model": {**shared_model, **model},
        "train": {**shared_train, **train}, "rl": {},
    })


_PRESETS += [
    _rl_preset(
        "corridor-cpu",
        "corridor of 20-60 steps (5-15 blocks of 4), L=128: minutes on 2 CPU cores",
        "corridor", {"colours": 2, "min_length": 20, "max_length": 60}, {"max_span": 128}, {},
    ),
    _rl_preset(
        "corridor-test",
        "corridor of 2-4 steps, L=16: seconds, for tests",
        "corridor", {"colours": 2, "min_length": 2, "max_length": 4}, {"max_span": 16},
        {"steps": 40, "batch_size": 16, "seq_len": 16, "lr": 3e-3, "eval_every": 40},
    ),
    _rl_preset(
        "instruction-cpu",
        "instruction (3 colours x 3 objects, 3 choices) after 10-30 distractors, L=64: minutes",
        "instruction",
        {"colours": 3, "objects": 3, "choices": 3, "min_delay": 10, "max_delay": 30},
        {"max_span": 64}, {},
    ),
    _rl_preset(
        "portal-cpu",
        "portal: 4 rooms x 3 portals, episodes of 32 steps, 2 layers, L=64: minutes",
        "portal", {"rooms": 4, "portals": 3, "episode_steps": 32},
        {"max_span": 64, "n_layers": 2}, {},
    ),
]

PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESETS}
DEFAULT_PRESETS: dict[str, str] = {
    "copy": "copy-cpu",
    "corridor": "corridor-cpu",
    "instruction": "instruction-cpu",
    "portal": "portal-cpu",
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}"
        ) from None
