"""What the reinforcement-learning tasks share: a symbolic gymnasium environment base class and
the :class:`RLTask` that the trainer and the command line see.

Observations are small tuples of token ids (``MultiDiscrete``) and actions are ``Discrete``, so an
agent embeds each field of an observation as a token. Every environment can save and restore its
whole state (including its random generator) as plain Python values, which makes a resumed
training run continue its episodes exactly where the checkpoint left them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from expire_span.tasks.base import SPLITS, check_split
from expire_span.tasks.hashing import hash_ints


class SymbolicEnv(gym.Env):
    """Base of the package's environments.

    Subclasses set ``Options`` (a dataclass of parameters; the constructor's keyword arguments are
    its fields), build ``observation_space`` (``MultiDiscrete``) and ``action_space``
    (``Discrete``) in :meth:`__init__`, and list in ``state_fields`` the attributes that make up
    their state. At the end of an episode ``info["success"]`` says how well it went (in [0, 1]).
    """

    Options: ClassVar[type]
    state_fields: ClassVar[tuple[str, ...]]
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    observation_space: spaces.MultiDiscrete
    action_space: spaces.Discrete

    def __init__(self, **options: Any) -> None:
        self.options = self.Options(**options)

    def set_options(self, **changes: Any) -> None:
        """Change options (validated as at construction); they apply from the next episode."""
        self.options = dataclasses.replace(self.options, **changes)

    def _observation(self, *tokens: int) -> np.ndarray:
        return np.asarray(tokens, dtype=np.int64)

    def _check_action(self, action: Any) -> int:
        if not self.action_space.contains(np.int64(action)):
            raise ValueError(f"{type(self).__name__}: invalid action {action!r}, expected an "
                             f"integer in [0, {self.action_space.n})")
        return int(action)

    def get_state(self) -> dict[str, Any]:
        """The environment's whole state, random generator included, as plain Python values."""
        state = {name: _plain(getattr(self, name)) for name in self.state_fields}
        rng = self.np_random.bit_generator.state
        # 128-bit generator words are stored as strings (checkpoints load plain types only)
        state["_rng"] = {**rng, "state": {k: str(v) for k, v in rng["state"].items()}}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""
        for name in self.state_fields:
            value = state[name]
            setattr(self, name, np.asarray(value) if isinstance(value, list) else value)
        rng = dict(state["_rng"])
        rng["state"] = {k: int(v) for k, v in rng["state"].items()}
        generator = np.random.Generator(getattr(np.random, rng["bit_generator"])())
        generator.bit_generator.state = rng
        self.np_random = generator


def check_ints(task: str, options: Any, *names: str) -> None:
    """``ValueError`` (one line naming the task and field) unless every field in ``names`` is an
    integer (a config file may hold ``150.0`` or ``true``, which would silently mean something
    else: a float corridor length breaks the draw, a bool is an int to numpy)."""
    for name in names:
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{task}: {name} must be an integer, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class RLTask:
    """A reinforcement-learning task: a registered :class:`SymbolicEnv` and its options.

    Subclasses set ``name``, ``Options``, ``env_class`` and ``env_id``. Every option is an
    ``expire-span train`` flag, exactly as for sequence tasks.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    env_class: ClassVar[type[SymbolicEnv]]
    env_id: ClassVar[str]
    primary_metric: ClassVar[str] = "success_rate"
    higher_is_better: ClassVar[bool] = True
    curriculum_fields: ClassVar[tuple[str, ...]] = ()
    """Integer options that set the episode lengths, scaled by a curriculum
    (:meth:`curriculum_options`); empty: the task has none."""
    CURRICULUM_START: ClassVar[float] = 0.1
    """Where a curriculum starts by default (``rl.curriculum_start``): this fraction of every
    length option."""

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        probe = self.env_class(**self.options_dict())
        self.observation_sizes: list[int] = [int(n) for n in probe.observation_space.nvec]
        self.num_actions: int = int(probe.action_space.n)

    @classmethod
    def register_env(cls) -> None:
        """Make ``env_id`` known to ``gymnasium.make`` (done for every registered task)."""
        if cls.env_id not in gym.registry:
            gym.register(id=cls.env_id, entry_point=cls.env_class)

    @property
    def dependency_length(self) -> int | None:
        """The longest distance (in steps) from a decision back to the observation it needs,
        within an episode (``None``: unknown). The span rule
        (:mod:`expire_span.training.span_rule`) starts spans above it, and Adaptive-Span at the
        same span as Expire-Span."""
        return None

    def decision_steps(self, observations: np.ndarray) -> np.ndarray:
        """``[B]`` bool: which of these observations (``[B, F]``, what the agent reads) ask for
        the decision the task scores, where the memory matters (the evaluation reports the
        memory size there, ``memory_at_decision``). Default: every step."""
        return np.ones(len(observations), dtype=bool)

    def curriculum_options(self, level: float, start: float = CURRICULUM_START
                           ) -> dict[str, int]:
        """The length options at curriculum ``level`` in [0, 1]: each of
        :attr:`curriculum_fields` times ``start + (1 - start) * level``, rounded, at least 1
        where the option is (an option left at None stays None); ``ValueError`` if the task has
        no such options."""
        if not self.curriculum_fields:
            raise ValueError(f"task {self.name!r} has no episode-length curriculum "
                             "(rl.curriculum_updates must be 0)")
        factor = start + (1.0 - start) * min(max(level, 0.0), 1.0)
        values = self.options_dict()
        return {name: max(min(values[name], 1), round(values[name] * factor))
                for name in self.curriculum_fields if values[name] is not None}

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def make_env(self) -> gym.Env:
        """One environment, made through gymnasium's registry."""
        return gym.make(self.env_id, **self.options_dict())

    def vector_env(self, num_envs: int) -> gym.vector.SyncVectorEnv:
        """``num_envs`` environments stepped together. An environment whose episode ends is
        reset in the same step: the observation returned is the new episode's first one, the
        finished episode's ``info`` is under ``info["final_info"]``."""
        return gym.make_vec(
            self.env_id, num_envs, vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
            **self.options_dict(),
        )

    @staticmethod
    def seeds(seed: int, split: str, count: int) -> list[int]:
        """Environment seeds of a split: a hash of (seed, split, index), so the train, valid and
        test episodes never share a seed."""
        check_split(split)
        values = hash_ints(seed, SPLITS.index(split), np.arange(count)) >> np.uint64(1)
        return [int(v) for v in values]
