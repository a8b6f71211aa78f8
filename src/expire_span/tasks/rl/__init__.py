"""Reinforcement-learning memory tasks: Corridor, Portal and Instruction.

Importing ``expire_span.tasks`` (which this package's import does first) registers the
environments with gymnasium, e.g.
``gymnasium.make("expire_span/Corridor-v0", min_length=20, max_length=60)``.
"""

from __future__ import annotations

from expire_span.tasks.rl.base import RLTask, SymbolicEnv
from expire_span.tasks.rl.corridor import CorridorEnv, CorridorOptions, CorridorTask
from expire_span.tasks.rl.instruction import InstructionEnv, InstructionOptions, InstructionTask
from expire_span.tasks.rl.portal import PortalEnv, PortalOptions, PortalTask

__all__ = [
    "CorridorEnv",
    "CorridorOptions",
    "CorridorTask",
    "InstructionEnv",
    "InstructionOptions",
    "InstructionTask",
    "PortalEnv",
    "PortalOptions",
    "PortalTask",
    "RLTask",
    "SymbolicEnv",
]
