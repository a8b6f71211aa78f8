"""A run's full configuration: task, model and training hyperparameters.

Values are resolved in layers, each overriding the previous: the dataclass defaults, a named preset,
a config file (JSON or TOML with sections ``task_options``, ``model``, ``train`` and, for
reinforcement-learning tasks, ``rl``), then flags. The resolved configuration is written into the
run directory, so a run always records what it used.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from expire_span.config import ModelConfig
from expire_span.model import MemoryAgent, MemoryTransformer, agent_vocab_size
from expire_span.tasks import RLTask, SequenceTask, build_task, is_rl_task, task_class
from expire_span.tasks.base import TextCodec
from expire_span.training.span_rule import DERIVED_FIELDS, SPAN_POLICIES, span_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps (one batch of ``batch_size`` x ``seq_len`` tokens each); for RL tasks,
    updates (a rollout of ``seq_len`` steps in ``batch_size`` environments, then PPO epochs)."""
    batch_size: int = 32
    """Rows per step: token streams, or environments for RL tasks. Under torchrun this is the
    global batch: each of the N processes reads batch_size / N of the rows."""
    accumulate: int = 1
    """Gradient accumulation: each process reads its rows in this many micro-batches (each with
    its own memory), one backward pass each, then takes one optimizer step."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast, CPU or CUDA) or ``fp16`` (autocast with loss scaling, CUDA
    only); the weights and the optimizer stay in float32."""
    seq_len: int | None = None
    """Tokens per row per step (RL: rollout steps per environment); ``None`` means one block
    (``block_len``)."""
    lr: float = 1e-3
    warmup: int = 100
    """Linear learning-rate warm-up steps."""
    schedule: str = "constant"
    """After warm-up: ``constant`` or ``cosine`` (decay to 10% at the last step)."""
    lr_drop_at: int | None = None
    """From this step on, the learning rate (of the schedule above) is multiplied by
    ``lr_drop``: a second, low-learning-rate phase, as the released enwik8 run (which
    continued its 100k steps at lr 7e-4 with 10k at 7e-5); ``None``: no drop. May be set when
    resuming, so a finished run can be continued at a lower rate."""
    lr_drop: float = 0.1
    """Factor applied to the learning rate from ``lr_drop_at`` on (in (0, 1])."""
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    """Adam's epsilon; larger values damp the steps of parameters whose gradients are tiny (the
    RL presets use 1e-5: once a task is solved its policy gradient vanishes, and with 1e-8 Adam
    still moved the weights at full speed along what was left, undoing what was learned)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    aux_hold: float = 0.5
    """Hold the memory policy's auxiliary loss at 0 until the smoothed training loss has fallen
    to this fraction of its first value (the task is being learned), so that it cannot shrink
    spans before the task shows which memories matter; 0 applies it from the first step. RL
    tasks use each rollout's failure rate (1 - success) as the loss."""
    aux_hold_until: float = 1.0
    """Fraction of the run after which the hold ends anyway, for tasks whose loss never falls to
    aux_hold times its first value. At 1 (the default) it never ends before the task is being
    learned: releasing it earlier shrank the spans of copy runs that were still learning below
    their dependency (docs/expire-span.md)."""
    aux_ramp: int = 100
    """Steps over which the auxiliary loss rises from 0 to its full weight once released."""
    eval_every: int = 200
    eval_batches: int = 20
    """Batches per periodic evaluation (language-modelling tasks read the whole split; RL tasks
    run this many episodes in each of ``eval_batch_size`` environments)."""
    eval_batch_size: int | None = None
    """Streams (or environments) run in parallel in evaluation; ``None`` means ``batch_size``.
    Data tasks give each stream a contiguous slice of the split: fewer, longer streams read less
    of it cold."""
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    keep_best: bool = True
    """Also keep the checkpoint of the best validation score so far in
    ``OUT/checkpoints/best`` (the task's primary metric; ties go to the later one): a run that
    learns a task and then loses it keeps what it learned."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun, each
    process uses ``cuda:LOCAL_RANK``)."""
    tensorboard: bool = True
    """Also write every record of metrics.jsonl as TensorBoard scalars to OUT/tensorboard."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accumulate", "eval_every", "eval_batches", "log_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"train.seq_len must be >= 1 or None, got {self.seq_len}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(
                f"train.eval_batch_size must be >= 1 or None, got {self.eval_batch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.warmup, train.grad_clip and train.weight_decay must be >= 0")
        if not 0.0 <= self.aux_hold < 1.0:
            raise ValueError(f"train.aux_hold must be in [0, 1), got {self.aux_hold}")
        if not 0.0 <= self.aux_hold_until <= 1.0:
            raise ValueError(f"train.aux_hold_until must be in [0, 1], got {self.aux_hold_until}")
        if self.aux_ramp < 0:
            raise ValueError(f"train.aux_ramp must be >= 0, got {self.aux_ramp}")
        if self.adam_eps <= 0:
            raise ValueError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"train.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.lr_drop_at is not None and self.lr_drop_at < 0:
            raise ValueError(f"train.lr_drop_at must be >= 0 or None, got {self.lr_drop_at}")
        if not 0.0 < self.lr_drop <= 1.0:
            raise ValueError(f"train.lr_drop must be in (0, 1], got {self.lr_drop}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class RLConfig:
    """Reinforcement learning (PPO with GAE), for RL tasks only."""

    gamma: float = 0.99
    """Discount factor of future rewards."""
    gae_lambda: float = 0.95
    """GAE lambda: 0 bootstraps from the next value only, 1 uses whole returns."""
    clip_range: float = 0.2
    """PPO clips the probability ratio of new and old policy to [1 - clip, 1 + clip]."""
    epochs: int = 4
    """PPO epochs (optimizer steps) per rollout; each replays the rollout step by step."""
    value_coef: float = 0.5
    """Weight of the value loss."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (exploration)."""
    normalize_advantages: bool = True
    """Standardise the advantages of each rollout."""
    eval_greedy: bool = True
    """Evaluation takes the most likely action (False: samples it, as in training)."""
    carry_memory: bool = False
    """Keep each environment's memory across its episodes (a stream of episodes, the episode
    start visible as the "none" previous action) instead of resetting it at every episode end,
    so that old episodes' memories age out and a span loss acts; evaluation does the same."""
    replay_blocks: bool = False
    """With carried memory, replay each rollout in one call (the model's blocks of
    ``block_len`` steps) instead of one call per step: several times faster, and a step then
    also gets gradients through the earlier states of its block, as in sequence training.
    Needs ``carry_memory`` (an episode ending inside a block cannot be reset there)."""
    curriculum_updates: int = 0
    """Updates over which the task's episode lengths grow linearly from ``curriculum_start`` of
    their options to the options themselves (0: no curriculum); evaluation always uses the
    options. Tasks without length options refuse it."""
    curriculum_start: float = RLTask.CURRICULUM_START
    """The fraction of the task's length options where the curriculum starts (in (0, 1])."""
    curriculum_success: float = 0.0
    """The curriculum only advances after an update whose finished training episodes succeeded
    at least this often (0: it advances every update); the lengths wait for the policy."""
    curriculum_retreat: float = 0.0
    """After an update whose finished training episodes succeeded less often than this, the
    curriculum steps back one step (never below its start; 0: it never steps back): a policy
    that lost the task at some length relearns it at shorter ones, where the memory it needs is
    in reach again, instead of waiting at chance for the lengths it failed at."""

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError("rl.gamma and rl.gae_lambda must be in [0, 1]")
        if self.clip_range <= 0 or self.epochs < 1:
            raise ValueError("rl.clip_range must be > 0 and rl.epochs >= 1")
        if self.value_coef < 0 or self.entropy_coef < 0:
            raise ValueError("rl.value_coef and rl.entropy_coef must be >= 0")
        if self.replay_blocks and not self.carry_memory:
            raise ValueError("rl.replay_blocks needs rl.carry_memory: with memory reset at "
                             "every episode end the replay must be step by step")
        if not 0 < self.curriculum_start <= 1:
            raise ValueError(f"rl.curriculum_start must be in (0, 1], got "
                             f"{self.curriculum_start!r}")
        if not 0 <= self.curriculum_success <= 1:
            raise ValueError(f"rl.curriculum_success must be in [0, 1], got "
                             f"{self.curriculum_success!r}")
        if not 0 <= self.curriculum_retreat <= self.curriculum_success:
            raise ValueError(f"rl.curriculum_retreat must be in [0, rl.curriculum_success], got "
                             f"{self.curriculum_retreat!r}")
        if not isinstance(self.curriculum_updates, int) or self.curriculum_updates < 0:
            raise ValueError(f"rl.curriculum_updates must be an integer >= 0, got "
                             f"{self.curriculum_updates!r}")


def vocab_size(task: SequenceTask | RLTask) -> int:
    """The model's vocabulary: the task's tokens, or what an agent embeds for an RL task."""
    if isinstance(task, RLTask):
        return agent_vocab_size(task.observation_sizes, task.num_actions)
    return task.vocab_size


@dataclass
class RunConfig:
    task: str = "copy"
    task_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    """``ModelConfig`` fields except ``vocab_size``, which the task decides."""
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: dict[str, Any] = field(default_factory=dict)
    """``RLConfig`` fields (RL tasks only)."""

    def build_task(self):
        return build_task(self.task, self.task_options)

    def text_codec(self) -> TextCodec:
        """The run's text-to-token mapping, from its recorded options (its data is not read)."""
        cls = task_class(self.task)
        return cls.text_codec(cls.Options(**self.task_options))

    def model_config(self, vocab_size: int) -> ModelConfig:
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size is set by the task, do not give it")
        return ModelConfig.from_dict({"vocab_size": vocab_size, **self.model})

    def build_model(self, vocab_size: int) -> nn.Module:
        """A fresh network for the task: a ``MemoryTransformer``, or a ``MemoryAgent`` on one for
        an RL task (whose environment is built to read its spaces; sequence tasks are not built,
        as that may mean reading a data set)."""
        config = self.model_config(vocab_size)
        if is_rl_task(self.task):
            task = self.build_task()
            return MemoryAgent(config, task.observation_sizes, task.num_actions)
        return MemoryTransformer(config)

    @property
    def rl_config(self) -> RLConfig:
        known = {f.name for f in dataclasses.fields(RLConfig)}
        unknown = sorted(set(self.rl) - known)
        if unknown:
            raise ValueError(f"unknown rl option(s): {', '.join(unknown)}")
        return RLConfig(**self.rl)

    @property
    def seq_len(self) -> int:
        block_len = self.model.get("block_len", ModelConfig.block_len)
        return self.train.seq_len or block_len

    @property
    def eval_batch_size(self) -> int:
        return self.train.eval_batch_size or self.train.batch_size

    def resolved(self) -> RunConfig:
        """A copy with every task option and model field spelled out (what a run records), after
        building everything once so that a bad value fails before training starts."""
        task = self.build_task()
        model = self.with_span_settings(task).model_config(vocab_size(task)).to_dict()
        del model["vocab_size"]
        if isinstance(task, RLTask):
            rl = dataclasses.asdict(self.rl_config)
        elif self.rl:
            raise ValueError(f"rl options apply to reinforcement-learning tasks only, not to "
                             f"{self.task!r}")
        else:
            rl = {}
        return RunConfig(self.task, task.options_dict(), model,
                         TrainConfig(**dataclasses.asdict(self.train)), rl)

    def with_span_settings(self, task: SequenceTask | RLTask) -> RunConfig:
        """A copy whose model fills the span hyperparameters it leaves unset from
        :func:`~expire_span.training.span_rule.span_settings`, when the task states its
        dependency length (``task.dependency_length``; with an RL curriculum, that of its
        first, shortest episodes); otherwise this config."""
        dependency = getattr(task, "dependency_length", None)
        if isinstance(task, RLTask) and self.rl.get("curriculum_updates"):
            # spans start above the first dependency the agent meets and grow with the lengths
            start = task.curriculum_options(0.0, self.rl_config.curriculum_start)
            first = build_task(self.task, {**task.options_dict(), **start})
            dependency = first.dependency_length
        missing = [name for name in DERIVED_FIELDS if name not in self.model]
        if dependency is None or not missing:
            return self
        get = lambda name: self.model.get(name, getattr(ModelConfig, name))  # noqa: E731
        if "init_percentage" in self.model and "adapt_span_init" in missing:
            missing.remove("adapt_span_init")  # both start at the span given for Expire-Span
            model = {"adapt_span_init": self.model["init_percentage"], **self.model}
        else:
            model = dict(self.model)
        if get("memory") not in SPAN_POLICIES:
            missing = [name for name in missing if name not in ("init_percentage",
                                                                 "adapt_span_init")]
        derived = span_settings(get("max_span"), get("block_len"), dependency, get("d_model"),
                                tuple(missing))
        model = {**derived, **model}
        return dataclasses.replace(self, model=model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(unknown)}")
        train = values.pop("train", {}) or {}
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(train) - known)
        if bad:
            raise ValueError(f"unknown train option(s): {', '.join(bad)}")
        return cls(**values, train=TrainConfig(**train))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge: nested dictionaries are merged, other values replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML run configuration (by extension)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot parse config file {path}: {error}") from None
