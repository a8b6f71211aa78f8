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
                "adapt_span_init": 0.6, "adapt_span_loss": 1e-4,
            },
            "train": {
                "steps": 600, "batch_size": 32, "seq_len": 128, "lr": 2e-3, "warmup": 50,
                "schedule": "cosine",
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
                "adapt_span_init": 0.6, "adapt_span_loss": 1e-4,
            },
            "train": {
                "steps": 300, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "warmup": 20,
                "schedule": "cosine",
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
                "pre_div": 64.0, "adapt_span_init": 0.6,
            },
            "train": {
                "steps": 20000, "batch_size": 32, "seq_len": 2048, "lr": 5e-4, "warmup": 1000,
                "eval_every": 1000, "eval_batches": 20, "log_every": 50,
                "checkpoint_every": 1000,
            },
        },
    ),
]

PRESETS: dict[str, Preset] = {preset.name: preset for preset in _PRESETS}
DEFAULT_PRESETS: dict[str, str] = {"copy": "copy-cpu"}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}"
        ) from None
