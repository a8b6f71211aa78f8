"""Instruction (our definition, SPEC.md section 4): follow an instruction given once, long ago.

::

    step 0                 steps 1 .. D                  step D + 1
    [instruction (c, o)] -> [distractor (c', o')] ... -> [choice: K (colour, object) options]

- The instruction names a colour and an object (two tokens). It is followed by ``D`` distractor
  steps (``D`` drawn uniformly from ``[min_delay, max_delay]``), each showing a random
  (colour, object) pair in the same slot as the instruction, then by a choice among ``K``
  distinct pairs, exactly one of which is the instruction.
- The options are cells of a small random colour x object grid around the instruction, so decoys
  share its colour or its object (both tokens must be remembered), yet nothing in the options
  says which one is the instruction.
- Actions are ``Discrete(K)``: ignored before the choice; at the choice, action ``k`` picks option
  ``k``, which ends the episode with reward 1 if it is the instruction, else 0.

Observation: ``[phase, colour_1, object_1, ..., colour_K, object_K]`` with phase 0 (instruction),
1 (distractor) or 2 (choice); unused slots hold the blank tokens ``C`` (colour) and ``O``
(object). A memoryless agent sees the choice without the instruction: chance is ``1 / K``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

from expire_span.tasks.rl.base import RLTask, SymbolicEnv, check_ints

INSTRUCTION, DISTRACTOR, CHOICE = 0, 1, 2


@dataclass
class InstructionOptions:
    colours: int = 3
    """C: colours an instruction may name."""
    objects: int = 3
    """O: objects an instruction may name."""
    choices: int = 3
    """K: options at the choice (chance is 1 / K)."""
    min_delay: int = 10
    """Fewest distractor steps D between the instruction and the choice."""
    max_delay: int = 20
    """Most distractor steps D (drawn uniformly per episode)."""

    def __post_init__(self) -> None:
        check_ints("instruction", self, "colours", "objects", "choices", "min_delay",
                   "max_delay")
        if self.colours < 1 or self.objects < 1:
            raise ValueError("instruction: colours and objects must be >= 1")
        if not 2 <= self.choices <= self.colours * self.objects:
            raise ValueError(
                f"instruction: choices must be in [2, colours x objects = "
                f"{self.colours * self.objects}], got {self.choices}"
            )
        if self.min_delay < 0 or self.max_delay < self.min_delay:
            raise ValueError(f"instruction: need 0 <= min_delay <= max_delay, got "
                             f"{self.min_delay}, {self.max_delay}")


class InstructionEnv(SymbolicEnv):
    """Observation ``MultiDiscrete([3] + [C + 1, O + 1] * K)``; action ``Discrete(K)``."""

    Options = InstructionOptions
    state_fields = ("colour", "item", "delay", "steps", "options_shown")
    options: InstructionOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = self.options
        self.observation_space = spaces.MultiDiscrete(
            [3] + [opts.colours + 1, opts.objects + 1] * opts.choices
        )
        self.action_space = spaces.Discrete(opts.choices)
        self.colour = self.item = self.delay = self.steps = 0
        self.options_shown = np.zeros((opts.choices, 2), dtype=np.int64)

    def _show(self, phase: int, pairs: np.ndarray) -> np.ndarray:
        opts = self.options
        slots = np.tile([opts.colours, opts.objects], (opts.choices, 1))
        slots[: len(pairs)] = pairs
        return self._observation(phase, *slots.ravel().tolist())

    def _random_pair(self) -> list[int]:
        rng = self.np_random
        return [int(rng.integers(self.options.colours)), int(rng.integers(self.options.objects))]

    def _choice_options(self) -> np.ndarray:
        """K distinct pairs including the instruction, in random order: K cells of a random grid
        of a few colours x a few objects that contains the instruction (grown one colour or one
        object at a time, in random order, until it holds K cells).

        The grid keeps decoys close (in a 2 x 2 grid every decoy shares the instruction's colour
        or object, or is the cell that shares neither), and as the grid's colours and objects and
        the K - 1 decoy cells are drawn uniformly around the instruction, the instruction is
        equally likely to be any option whatever the options look like: the choice alone tells
        nothing. (Taking a same-colour and a same-object decoy every time would make the
        instruction the one option that shares an attribute with both others.)
        """
        opts, rng = self.options, self.np_random
        rows, cols = 1, 1
        while rows * cols < opts.choices:
            grow_rows = rows < opts.colours and (cols == opts.objects or rng.random() < 0.5)
            rows, cols = (rows + 1, cols) if grow_rows else (rows, cols + 1)
        colours = [self.colour, *_others(rng, opts.colours, self.colour, rows - 1)]
        objects = [self.item, *_others(rng, opts.objects, self.item, cols - 1)]
        decoys = [(c, o) for c in colours for o in objects][1:]  # every cell but the instruction
        picks = rng.choice(len(decoys), size=opts.choices - 1, replace=False)
        chosen = [(self.colour, self.item)] + [decoys[i] for i in picks]
        return np.asarray(chosen, dtype=np.int64)[rng.permutation(opts.choices)]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.colour, self.item = self._random_pair()
        self.delay = int(self.np_random.integers(self.options.min_delay,
                                                 self.options.max_delay + 1))
        self.steps = 0
        self.options_shown = np.zeros((self.options.choices, 2), dtype=np.int64)
        return self._show(INSTRUCTION, np.asarray([[self.colour, self.item]])), {}

    def step(self, action: Any):
        action = self._check_action(action)
        self.steps += 1
        if self.steps <= self.delay:
            return self._show(DISTRACTOR, np.asarray([self._random_pair()])), 0.0, False, False, {}
        if self.steps == self.delay + 1:
            self.options_shown = self._choice_options()
            return self._show(CHOICE, self.options_shown), 0.0, False, False, {}
        picked = self.options_shown[action]
        reward = float(picked[0] == self.colour and picked[1] == self.item)
        blank = self._show(CHOICE, np.zeros((0, 2), dtype=np.int64))
        return blank, reward, True, False, {"success": reward}


def _others(rng: np.random.Generator, count: int, excluded: int, size: int) -> list[int]:
    """``size`` distinct values of ``[0, count)`` other than ``excluded``, in random order."""
    values = rng.permutation(count - 1)[:size]
    return [int(v + (v >= excluded)) for v in values]


class InstructionTask(RLTask):
    name = "instruction"
    Options = InstructionOptions
    env_class = InstructionEnv
    env_id = "expire_span/Instruction-v0"
    curriculum_fields = ("min_delay", "max_delay")

    options: InstructionOptions

    @property
    def dependency_length(self) -> int:
        """The choice is read ``D + 1 <= max_delay + 1`` steps after the instruction."""
        return self.options.max_delay + 1

    def decision_steps(self, observations: np.ndarray) -> np.ndarray:
        """The choice."""
        return np.asarray(observations)[:, 0] == CHOICE
