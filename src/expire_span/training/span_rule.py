"""Span hyperparameters derived from the stream and the dependency a task needs.

Expire-Span and Adaptive-Span have four knobs a user should not have to tune by hand: the ramp R,
the starting span ``p L``, the loss coefficient ``alpha`` and the predictor's pre-division ``c``.
For a task that states its dependency (the distance from a query back to what it needs, e.g.
``K + D`` for copy), :func:`span_settings` derives them from ``L``, ``M`` and that distance;
``RunConfig.resolved`` fills in whichever of them the preset, config file and flags leave unset.
Why each value: docs/expire-span.md, "Choosing the span hyperparameters".
"""

from __future__ import annotations

import math
from typing import Any

MARGIN = 1.25
"""The starting span exceeds the dependency by this factor: a memory that expires before it is
needed gets no gradient that could make it live longer, so spans must start above the need."""
LONGEST_START = 0.9
"""Largest starting fraction of L: above it the sigmoid saturates and the spans learn slowly."""
ALPHA = 1e-4
"""The auxiliary loss coefficient (both loss forms; see ``ModelConfig.span_loss``)."""

SPAN_POLICIES = ("expire-span", "adaptive-span")
"""The policies whose spans start from ``init_percentage`` / ``adapt_span_init``: only for them is
a starting span derived (and a too short L refused); a Transformer-XL window below the rule's
starting span is a valid run."""

DERIVED_FIELDS = ("ramp", "init_percentage", "alpha", "pre_div", "adapt_span_init")
"""The ``ModelConfig`` fields :func:`span_settings` sets. ``adapt_span_init`` is always the
starting fraction Expire-Span uses (given or derived): both start at the same span."""


def starting_span(block_len: int, dependency: int) -> float:
    """``MARGIN * dependency + R + M``: above the dependency with a margin, plus the ramp and one
    block, so that the memory is still at full weight for the last query of a block that needs
    it."""
    return MARGIN * dependency + ramp_length(block_len) + block_len


def ramp_length(block_len: int) -> int:
    """R = M / 2 (at least 2): long enough for a smooth gradient, short next to the memory a
    query keeps (the average memory cannot go below about R - 1)."""
    return max(2, block_len // 2)


def starting_fraction(max_span: int, block_len: int, dependency: int) -> float:
    """p = starting span / L; ``ValueError`` when L is too short for the dependency (no span
    below ``LONGEST_START * L`` would start above it)."""
    if dependency < 0:
        raise ValueError(f"the dependency length must be >= 0, got {dependency}")
    start = starting_span(block_len, dependency)
    if start > LONGEST_START * max_span:
        needed = math.ceil(start / LONGEST_START)
        raise ValueError(
            f"max_span L={max_span} is too short for a dependency of {dependency} steps: spans "
            f"must start above {start:.0f} (1.25 x dependency + ramp + block); use L >= {needed} "
            "or set init_percentage yourself"
        )
    return max(start / max_span, 0.01)


def span_settings(max_span: int, block_len: int, dependency: int, d_model: int,
                  fields: tuple[str, ...] = DERIVED_FIELDS) -> dict[str, Any]:
    """The derived values of ``fields`` (a subset of :data:`DERIVED_FIELDS`); the starting span
    is only derived (and checked) when one of them needs it."""
    values: dict[str, Any] = {"ramp": ramp_length(block_len), "alpha": ALPHA,
                              "pre_div": math.sqrt(d_model)}
    if {"init_percentage", "adapt_span_init"} & set(fields):
        values["init_percentage"] = starting_fraction(max_span, block_len, dependency)
        values["adapt_span_init"] = values["init_percentage"]
    return {name: values[name] for name in fields}
