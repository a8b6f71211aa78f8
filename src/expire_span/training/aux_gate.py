"""When the memory policies' auxiliary losses start to act (``train.aux_hold``).

Why: with Adam a parameter moves by about ``lr`` per step in the direction of its gradient,
whatever that gradient's size. Before a task is learned its gradient says nothing about which
memories matter, so an auxiliary loss that shrinks spans (Expire-Span's, Adaptive-Span's) alone
decides where the span predictor goes, however small its coefficient: on long copy tasks it
shrank every span below the dependency within ~80 steps, and a memory that has expired never
gets the gradient that would make it grow back (docs/expire-span.md, "Holding the auxiliary loss
back"). So the auxiliary losses are held at 0 until the task is being learned, measured without
knowing anything of the task or the policy: the smoothed training loss has fallen to
``aux_hold`` times its starting value. Then their weight rises linearly to 1 over ``aux_ramp``
steps. ``aux_hold_until`` (a fraction of the run) may end the hold earlier for tasks whose loss
never falls that far; by default it does not: a release before the task was learned shrank the
spans of still-learning copy runs below their dependency. Only losses that push memories out
are held (:attr:`~expire_span.policies.MemoryPolicy.aux_loss_forgets`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

from expire_span.policies import MemoryPolicy

if TYPE_CHECKING:
    from expire_span.training.config import TrainConfig

SMOOTHING = 0.9
"""Weight of the past in the exponential average of the training loss."""


class AuxiliaryGate:
    """The weight (in [0, 1]) of the auxiliary losses at each step.

    Args:
        hold: release once the smoothed loss is at most ``hold`` times the first observed loss
            (``0``: no hold and no ramp, weight 1 from the first step).
        release_step: the step at which the hold ends whatever the loss.
        ramp: steps over which the weight rises from 0 to 1 after the release.
    """

    def __init__(self, hold: float, release_step: int, ramp: int) -> None:
        self.hold = hold
        self.release_step = release_step
        self.ramp = ramp
        self.start_loss: float | None = None
        self.smoothed: float | None = None
        self.opened_at: int | None = self._always if hold == 0 else None
        """The step at which the hold ended (None while it lasts)."""

    @property
    def _always(self) -> int:
        """An ``opened_at`` that gives full weight from step 0 (no hold, no ramp)."""
        return -self.ramp

    def apply(self, model: nn.Module, step: int) -> float:
        """The weight of ``step``, also given to every memory policy of ``model``
        (``MemoryPolicy.aux_weight``) before its forward: what a policy does to counter its own
        auxiliary loss follows that loss's weight."""
        weight = self.scale(step)
        for module in model.modules():
            if isinstance(module, MemoryPolicy):
                module.aux_weight = weight
        return weight

    def scale(self, step: int) -> float:
        if self.opened_at is None:
            return 0.0
        if self.ramp == 0:
            return 1.0
        return min(1.0, (step - self.opened_at + 1) / self.ramp)

    def observe(self, step: int, loss: float | None) -> None:
        """Take the training loss of ``step`` (``None``: the step scored nothing)."""
        if self.opened_at is not None:
            return
        if loss is not None and math.isfinite(loss):
            if self.start_loss is None:
                self.start_loss = self.smoothed = loss
            else:
                self.smoothed = SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
            if self.smoothed <= self.hold * self.start_loss:
                self.opened_at = step + 1
        if self.opened_at is None and step + 1 >= self.release_step:
            self.opened_at = step + 1

    def state_dict(self) -> dict[str, Any]:
        return {"start_loss": self.start_loss, "smoothed": self.smoothed,
                "opened_at": self.opened_at}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint from before the gate existed)
        means the auxiliary losses acted from the start."""
        if state is None:
            state = {"start_loss": None, "smoothed": None, "opened_at": self._always}
        self.start_loss = state["start_loss"]
        self.smoothed = state["smoothed"]
        self.opened_at = state["opened_at"]


def run_gate(train: TrainConfig, model: nn.Module) -> AuxiliaryGate:
    """The gate of a training run: ``train``'s hold, deadline and ramp for a model whose memory
    policies' auxiliary losses push memories out; no hold for any other (a Compressive model's
    reconstruction loss acts from the first step)."""
    forgets = any(isinstance(module, MemoryPolicy) and module.aux_loss_forgets
                  for module in model.modules())
    return AuxiliaryGate(train.aux_hold if forgets else 0.0,
                         math.ceil(train.aux_hold_until * train.steps), train.aux_ramp)
