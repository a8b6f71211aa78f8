"""Corridor (our definition, SPEC.md section 4): remember a colour across a long corridor.

::

    step 0        steps 1 .. N-1       step N
    [cue c]  ->  [corridor] ... [corridor]  ->  [junction]: take exit c

- At the first step only, the observation is the cue, one of ``C`` colours. Then the agent moves
  through a corridor of ``N`` cells (``N`` drawn uniformly from ``[min_length, max_length]`` per
  episode), seeing only "corridor", until it reaches the junction, where it sees "junction".
- Actions: 0 is forward; ``1 + c`` takes exit ``c``. The corridor is one-way: every action moves
  the agent one cell forward (there are no exits yet). At the junction forward is a wall (the agent
  stays) and taking exit ``c`` ends the episode with reward 1 if ``c`` is the cue, else 0.
- After ``step_limit`` steps without an exit the episode is cut (truncated) with reward 0.

The junction is always ``N`` steps after the cue, and the cue is the one observation that matters
there; a memoryless agent sees the same "junction" whatever the cue and can do no better than
``1 / C``. (Our choice: the corridor is one-way so that the task measures memory, not exploration;
see docs/rl.md for what a walking version cost.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

from expire_span.tasks.rl.base import RLTask, SymbolicEnv, check_ints

FORWARD = 0


@dataclass
class CorridorOptions:
    colours: int = 2
    """C: cue colours, one exit per colour (chance is 1 / C)."""
    min_length: int = 10
    """Shortest corridor N: steps from the cue to the junction."""
    max_length: int = 20
    """Longest corridor N (N is drawn uniformly per episode)."""
    step_limit: int | None = None
    """Steps after which an episode is cut with reward 0; None: 2 x (max_length + 1)."""

    def __post_init__(self) -> None:
        check_ints("corridor", self, "colours", "min_length", "max_length", "step_limit")
        if self.colours < 2:
            raise ValueError(f"corridor: colours must be >= 2, got {self.colours}")
        if self.min_length < 1 or self.max_length < self.min_length:
            raise ValueError(
                f"corridor: need 1 <= min_length <= max_length, got {self.min_length}, "
                f"{self.max_length}"
            )
        if self.step_limit is not None and self.step_limit <= self.max_length:
            raise ValueError(f"corridor: step_limit ({self.step_limit}) must exceed max_length "
                             f"({self.max_length}), or no episode could be finished")

    @property
    def limit(self) -> int:
        return self.step_limit if self.step_limit is not None else 2 * (self.max_length + 1)


class CorridorEnv(SymbolicEnv):
    """Observation: ``[token]`` with token ``c < C`` the cue, ``C`` corridor, ``C + 1`` junction.
    Action: ``Discrete(C + 1)``, 0 forward, ``1 + c`` exit ``c``."""

    Options = CorridorOptions
    state_fields = ("cue", "length", "position", "steps")
    options: CorridorOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        colours = self.options.colours
        self.corridor, self.junction = colours, colours + 1
        self.observation_space = spaces.MultiDiscrete([colours + 2])
        self.action_space = spaces.Discrete(colours + 1)
        self.cue = self.length = self.position = self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        opts = self.options
        self.cue = int(self.np_random.integers(opts.colours))
        self.length = int(self.np_random.integers(opts.min_length, opts.max_length + 1))
        self.position = self.steps = 0
        return self._observation(self.cue), {"length": self.length}

    def step(self, action: Any):
        action = self._check_action(action)
        self.steps += 1
        reward, terminated, info = 0.0, False, {}
        if self.position < self.length:
            self.position += 1
        elif action != FORWARD:
            terminated = True
            reward = float(action - 1 == self.cue)
            info["success"] = reward
        truncated = not terminated and self.steps >= self.options.limit
        if truncated:
            info["success"] = 0.0
        token = self.junction if self.position == self.length else self.corridor
        return self._observation(token), reward, terminated, truncated, info


class CorridorTask(RLTask):
    name = "corridor"
    Options = CorridorOptions
    env_class = CorridorEnv
    env_id = "expire_span/Corridor-v0"
    curriculum_fields = ("min_length", "max_length", "step_limit")

    options: CorridorOptions

    @property
    def dependency_length(self) -> int:
        """The junction is read ``N <= max_length`` steps after the cue."""
        return self.options.max_length

    def decision_steps(self, observations: np.ndarray) -> np.ndarray:
        """The junction (where the exit taken decides the reward)."""
        return np.asarray(observations)[:, 0] == self.options.colours + 1
