"""Transformer-XL (Dai et al., 2019): a fixed window over the last L steps.

Each query at step t attends to the keys at steps t - L ... t (a sliding window, so block calls and
token-by-token calls see the same keys), and the cache keeps exactly the last L states, the ones the
next query can still see. Cost grows linearly with L whatever the data.
"""

from __future__ import annotations

from torch import Tensor

from expire_span.policies.base import BlockContext, DecodeRule, MaskDecision, MemoryPolicy
from expire_span.policies.flex_mask import SpanMask, key_ages


class TransformerXLPolicy(MemoryPolicy):
    name = "transformer-xl"

    def decide(self, context: BlockContext) -> MaskDecision:
        span = self.config.max_span
        next_age = context.next_step - context.states.steps
        if context.flex:  # the window as FlexAttention's mask
            ages = key_ages(context.states.steps, context.states.valid,
                            context.next_step - context.num_queries)
            return MaskDecision(bias=None, aux_loss=self.zero(context), keep=next_age <= span,
                                flex=SpanMask(ages, window=span))
        outside = context.age > span
        bias = context.inputs.new_zeros(outside.shape).masked_fill(outside, float("-inf"))
        return MaskDecision(
            bias=bias.unsqueeze(1),
            aux_loss=self.zero(context),
            keep=next_age <= span,
        )

    def decode_rule(self) -> DecodeRule:
        return WindowRule(self.config.max_span)


class WindowRule(DecodeRule):
    """One-token steps attend the last L memories and the query; nothing else is kept."""

    def __init__(self, window: int) -> None:
        self.window = window

    def alive(self, kept: Tensor | None, next_age: Tensor) -> Tensor:
        return next_age <= self.window
