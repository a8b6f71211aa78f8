"""Adaptive-Span (Sukhbaatar et al., 2019): every head learns how far back it looks.

Per layer and head h, one learned span ``z_h = L * f_h`` with ``f_h`` a parameter kept in
``[0, 1]`` (clamped after every optimizer step) and started at ``adapt_span_init``:

- soft mask over the distance ``d = t - i`` of key i from query t:
  ``m_h(d) = clamp(1 + (z_h - d) / R, 0, 1)`` for ``d <= L``, 0 beyond L (the window, as in
  Transformer-XL); attention ``softmax(s + log m)``, so the bias is per head ``[B, H, T, N]``;
- L1 loss on the spans: ``adapt_span_loss * mean_h z_h`` per layer (the released code's
  ``coefficient * L * mean(f)``), the same for every call, so it is a per-query mean;
- the memory keeps the states some head can still see from the next query, i.e. those with
  ``m_h(d_next) > 0`` for some h: at most ``max_h z_h + R`` of them, so the cost follows the
  learned spans. Masks only fall with distance, so trimming changes no output (in eval mode);
  with ``prune_expired=False`` the last L states are kept instead.

The span gets gradients from the task loss through keys on the ramp (``0 < m < 1``) and from the
L1 loss; a key far beyond the span gets none, so spans must start long enough to reach a
dependency the model should learn (``adapt_span_init``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.policies.base import (
    BlockContext,
    MaskDecision,
    MemoryPolicy,
    log_mask_bias,
    ramp_mask,
)
from expire_span.policies.flex_mask import SpanMask, key_ages


class AdaptiveSpanPolicy(MemoryPolicy):
    name = "adaptive-span"

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.span_fraction = nn.Parameter(torch.full((config.n_heads,), config.adapt_span_init))

    def spans(self) -> Tensor:
        """``[H]`` current spans ``z = L * f``."""
        return self.config.max_span * self.span_fraction

    def mask(self, distance: Tensor) -> Tensor:
        """``[..., H, T, N]`` soft masks for distances ``[..., T, N]`` (0 beyond L)."""
        distance = distance.unsqueeze(-3).to(self.span_fraction.dtype)
        mask = ramp_mask(self.spans().view(-1, 1, 1) - distance, self.config.ramp)
        return mask.masked_fill(distance > self.config.max_span, 0.0)

    def decide(self, context: BlockContext) -> MaskDecision:
        cfg = self.config
        aux = cfg.adapt_span_loss * self.spans().mean()
        next_age = (context.next_step - context.states.steps).unsqueeze(1)  # [B, 1, N]
        with torch.no_grad():
            keep = next_age.squeeze(1) <= cfg.max_span
            if cfg.prune_expired:
                keep = (self.mask(next_age) > 0).any(dim=1).squeeze(1)
        if context.flex:  # per-head spans and the window, as FlexAttention's mask
            ages = key_ages(context.states.steps, context.states.valid,
                            context.next_step - context.num_queries)
            flex = SpanMask(ages, self.spans(), float(cfg.ramp), cfg.max_span)
            return MaskDecision(bias=None, aux_loss=aux, keep=keep, flex=flex)
        return MaskDecision(bias=log_mask_bias(self.mask(context.age)), aux_loss=aux, keep=keep)

    def after_optimizer_step(self) -> None:
        """Keep every span in ``[0, L]``."""
        with torch.no_grad():
            self.span_fraction.clamp_(0.0, 1.0)
