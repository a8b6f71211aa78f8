"""A block's attention mask as per-key quantities, for FlexAttention (``attention="flex"``).

With ``ModelConfig.attention = "flex"`` the layer asks its policy (``BlockContext.flex``) to
describe the mask instead of building the ``[B, 1 or H, T, N]`` bias: the policy returns a
:class:`FlexMask` in ``MaskDecision.flex``, and ``model/flex_attention.py`` turns it into a
FlexAttention ``score_mod`` (the bias, computed inside the kernel), a ``mask_mod`` (which entries
are visible) and a block mask (which tiles of 128 queries x 128 keys to compute at all).

A mask is described by three things, all functions of the block's query index ``q`` (0 for the
block's first query, whose step is ``t0``) and a key index ``kv``:

- :meth:`FlexMask.mask_mod`: whether query ``q`` sees key ``kv`` with a nonzero weight;
- :meth:`FlexMask.score_mod`: the score plus the bias (``log m``); it hides invisible entries
  itself too, so a block wrongly treated as fully visible still gives the right answer;
- :meth:`FlexMask.query_ranges`: for every key, the contiguous range ``[lo, hi)`` of queries that
  see it (visibility is contiguous in ``q`` for every policy here: keys come into view when the
  query reaches them and leave it once for good), up to ``uncertain`` queries at the end of each
  range that rounding may put on either side. The block mask and the memory size come from these
  ranges, so no ``[B, T, N]`` tensor is needed.

:class:`SpanMask` is the form Expire-Span, Adaptive-Span and Transformer-XL share:
``m = clamp(1 + (z - a) / R, 0, 1)`` for the age ``a = t - s`` of a key, with ``z`` the key's span
(``[B, N]``) or its head's (``[H]``), hidden beyond a window and for future keys. A policy whose
mask has another form subclasses :class:`FlexMask` in its own file (Compressive does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``score_mod(score, b, h, q, kv) -> score`` (FlexAttention's signature)."""
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mask_mod(b, h, q, kv) -> bool`` (FlexAttention's signature)."""

FUTURE = -(2**30)
"""The age given to padding slots: a key in every query's future, so hidden from all of them."""
TINY = torch.finfo(torch.float32).tiny


def key_ages(steps: Tensor, valid: Tensor, first_query_step: int) -> Tensor:
    """``[B, N]`` int32: each key's age at the block's first query (``t0 - s``; a query ``q``
    later sees it at age ``key_age + q``); padding gets :data:`FUTURE`."""
    age = (first_query_step - steps).clamp(FUTURE + 1, 2**30)
    return age.masked_fill(~valid, FUTURE).to(torch.int32)


class FlexMask:
    """How a policy describes one block's mask to FlexAttention (see the module docstring).

    Subclasses implement :meth:`mask_mod` and :meth:`query_ranges`, and override
    :meth:`score_mod` when the mask has weights other than 0 and 1.
    """

    def mask_mod(self) -> MaskMod:
        raise NotImplementedError

    def score_mod(self) -> ScoreMod:
        """Hides what :meth:`mask_mod` hides; keeps the other scores unchanged."""
        visible = self.mask_mod()

        def mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return torch.where(visible(b, h, q, kv), score, -math.inf)

        return mod

    def query_ranges(self, num_queries: int) -> tuple[Tensor, Tensor, int]:
        """``(lo, hi, uncertain)``: ``[B, 1 or H, N]`` int64, the queries ``lo <= q < hi`` (in
        ``[0, num_queries]``) see the key; the last ``uncertain`` of them, and as many after
        ``hi``, may fall on either side (rounding)."""
        raise NotImplementedError


@dataclass
class SpanMask(FlexMask):
    """``m = clamp(1 + (z - a) / R, 0, 1)``, bias ``log m``; hidden where ``m = 0``, for future
    keys (``a < 0``) and padding, and beyond ``window`` (``a > window``).

    Attributes:
        key_age: ``[B, N]`` int32 from :func:`key_ages`.
        spans: ``z``: ``[B, N]`` one per key (Expire-Span) or ``[H]`` one per head
            (Adaptive-Span); ``None``: ``m = 1`` wherever visible (Transformer-XL). Gradients
            reach it through FlexAttention's backward (CUDA only).
        ramp: ``R``.
        window: the oldest visible age, or ``None``.
    """

    key_age: Tensor
    spans: Tensor | None = None
    ramp: float = 1.0
    window: int | None = None

    @property
    def per_head(self) -> bool:
        return self.spans is not None and self.spans.dim() == 1

    def _weight(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(visible, m)`` of an entry; the same expression as ``policies.base.ramp_mask``."""
        key_age, spans, ramp, window = self.key_age, self.spans, self.ramp, self.window
        per_head = self.per_head

        def weight(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor]:
            age = key_age[b, kv] + q
            visible = age >= 0
            if window is not None:
                visible = visible & (age <= window)
            if spans is None:
                return visible, visible
            span = spans[h] if per_head else spans[b, kv]
            mask = (1.0 + (span - age) / ramp).clamp(0.0, 1.0)
            return visible & (mask > 0), mask

        return weight

    def mask_mod(self) -> MaskMod:
        weight = self._weight()

        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return weight(b, h, q, kv)[0]

        return mod

    def score_mod(self) -> ScoreMod:
        if self.spans is None:
            return super().score_mod()
        weight = self._weight()

        def mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            visible, mask = weight(b, h, q, kv)
            return torch.where(visible, score + torch.log(mask.clamp_min(TINY)), -math.inf)

        return mod

    def query_ranges(self, num_queries: int) -> tuple[Tensor, Tensor, int]:
        age = self.key_age.long().unsqueeze(1)  # [B, 1, N]
        lo = (-age).clamp(0, num_queries)
        hi = torch.full_like(age, num_queries)
        if self.window is not None:
            hi = hi.minimum(self.window - age + 1)  # a <= window
        uncertain = 0
        if self.spans is not None:
            spans = self.spans.detach().double()
            spans = spans.view(1, -1, 1) if self.per_head else spans.unsqueeze(1)
            # m > 0 <=> a < z + R <=> q < z + R - age: exactly, up to float32 rounding.
            first_hidden = torch.ceil(spans + self.ramp - age).clamp(-1, num_queries + 1).long()
            hi = hi.minimum(first_hidden)
            uncertain = 1
        return lo.expand_as(hi), hi.clamp(0, num_queries).maximum(lo), uncertain
