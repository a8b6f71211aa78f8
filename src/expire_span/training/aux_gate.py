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

After the release the loss may still push a span below its dependency (a memory that expires
before it is needed gets no gradient to come back: a K = 8, D = 1000 copy solved at step 1000,
then lost a third of its accuracy as its memory kept shrinking). With ``aux_guard`` > 0 the gate
also watches that: once the smoothed loss has given back ``aux_guard`` of what it had gained
(from the first loss down to its best since the release), the weight drops to 0 again, and
comes back (ramped, and halved for every such regression) once the loss has recovered to within
half that margin of its best.
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
        guard: after the release, hold again once the smoothed loss has risen above its best
            by ``guard`` times the gain (first loss minus best); ``0``: never.
    """

    def __init__(self, hold: float, release_step: int, ramp: int, guard: float = 0.0) -> None:
        self.hold = hold
        self.release_step = release_step
        self.ramp = ramp
        self.guard = guard if hold > 0 else 0.0
        self.start_loss: float | None = None
        self.smoothed: float | None = None
        self.opened_at: int | None = self._always if hold == 0 else None
        """The step at which the hold ended (None while it lasts)."""
        self.best: float | None = None
        """The lowest smoothed loss since the release (``guard`` only)."""
        self.regressions = 0
        """How often the guard has held the losses again; each halves their weight."""

    @property
    def _always(self) -> int:
        """An ``opened_at`` that gives full weight from step 0 (no hold, no ramp)."""
        return -self.ramp

    @property
    def watching(self) -> bool:
        """Whether :meth:`observe` still needs the training loss."""
        return self.opened_at is None or self.guard > 0

    def scale(self, step: int) -> float:
        if self.opened_at is None:
            return 0.0
        weight = 0.5**self.regressions
        if self.ramp == 0:
            return weight
        return weight * min(1.0, (step - self.opened_at + 1) / self.ramp)

    def observe(self, step: int, loss: float | None) -> None:
        """Take the training loss of ``step`` (``None``: the step scored nothing)."""
        if not self.watching:
            return
        if loss is not None and math.isfinite(loss):
            if self.start_loss is None:
                self.start_loss = self.smoothed = loss
            else:
                self.smoothed = SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
            if self.opened_at is not None or self.best is not None:
                self._guard(step)
            elif self.smoothed <= self.hold * self.start_loss:
                self.opened_at = step + 1
        if self.opened_at is None and self.best is None and step + 1 >= self.release_step:
            self.opened_at = step + 1

    def _guard(self, step: int) -> None:
        """After the release: hold again on a regression, reopen on recovery."""
        assert self.smoothed is not None and self.start_loss is not None
        held = self.best is not None and self.opened_at is None
        self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)
        margin = self.guard * max(self.start_loss - self.best, 0.0)
        if not held and self.smoothed > self.best + margin:
            self.opened_at, self.regressions = None, self.regressions + 1
        elif held and self.smoothed <= self.best + margin / 2:
            self.opened_at = step + 1

    def state_dict(self) -> dict[str, Any]:
        return {"start_loss": self.start_loss, "smoothed": self.smoothed,
                "opened_at": self.opened_at, "best": self.best,
                "regressions": self.regressions}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint from before the gate existed)
        means the auxiliary losses acted from the start."""
        if state is None:
            state = {"start_loss": None, "smoothed": None, "opened_at": self._always}
        self.start_loss = state["start_loss"]
        self.smoothed = state["smoothed"]
        self.opened_at = state["opened_at"]
        self.best = state.get("best")  # absent before the guard existed
        self.regressions = state.get("regressions", 0)


def run_gate(train: TrainConfig, model: nn.Module) -> AuxiliaryGate:
    """The gate of a training run: ``train``'s hold, deadline and ramp for a model whose memory
    policies' auxiliary losses push memories out; no hold for any other (a Compressive model's
    reconstruction loss acts from the first step)."""
    forgets = any(isinstance(module, MemoryPolicy) and module.aux_loss_forgets
                  for module in model.modules())
    return AuxiliaryGate(train.aux_hold if forgets else 0.0,
                         math.ceil(train.aux_hold_until * train.steps), train.aux_ramp,
                         train.aux_guard)
