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

The bias is differentiated only on the key columns where some head's mask is on its ramp (it is a
constant 0 or ``-inf`` elsewhere), and names them (``MaskDecision.bias_grad_index``), so that on
CPU the layer uses the fused ramp-column attention (``model/ramp_attention.py``) as for
Expire-Span. The span gets gradients from the task loss through keys on the ramp (``0 < m < 1``)
and from the L1 loss; a key far beyond the span gets none, so spans must start long enough to
reach a dependency the model should learn (``adapt_span_init``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.policies.base import (
    BlockContext,
    DecodeRule,
    MaskDecision,
    MemoryPolicy,
    log_mask_bias,
    ramp_mask,
    selected_columns,
    write_columns_,
)
from expire_span.policies.flex_mask import SpanMask, key_ages


class AdaptiveSpanPolicy(MemoryPolicy):
    name = "adaptive-span"
    aux_loss_forgets = True

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.span_fraction = nn.Parameter(torch.full((config.n_heads,), config.adapt_span_init))

    @property
    def lr_scale(self) -> float:
        return self.config.span_lr_scale

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
        keep = self.alive(context.next_step - context.states.steps)
        if context.flex:  # per-head spans and the window, as FlexAttention's mask
            ages = key_ages(context.states.steps, context.states.valid,
                            context.next_step - context.num_queries)
            flex = SpanMask(ages, self.spans(), float(cfg.ramp), cfg.max_span)
            return MaskDecision(bias=None, aux_loss=aux, keep=keep, flex=flex)
        bias, index, columns = self._bias(context.age)
        return MaskDecision(bias=bias, aux_loss=aux, keep=keep, bias_grad_index=index,
                            bias_columns=columns)

    def alive(self, next_age: Tensor) -> Tensor:
        """``[B, N]``: the memories some head can still see ``next_age`` (``[B, N]``) steps on
        (with ``prune_expired=False``: the last L)."""
        with torch.no_grad():
            if not self.config.prune_expired:
                return next_age <= self.config.max_span
            return (self.mask(next_age.unsqueeze(1)) > 0).any(dim=1).squeeze(1)

    def decode_rule(self) -> DecodeRule:
        return HeadSpanRule(self)

    def _bias(self, age: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, H, T, N]`` bias ``log m`` (a constant), the ``[B, C]`` key columns outside which
        it has a zero derivative and its differentiable values there (``[B, H, T, C]``). ``m``
        has one only on its ramp (``0 < 1 + (z - d) / R <= 1``, the clamp passing the gradient
        at 1, and ``d <= L``), a few distances per head; elsewhere the bias is the constant 0 or
        ``-inf``. So ``m`` is differentiated on those columns only."""
        with torch.no_grad():
            distance = age.unsqueeze(-3).to(self.span_fraction.dtype)
            unclamped = 1.0 + (self.spans().view(-1, 1, 1) - distance) / self.config.ramp
            hidden = (unclamped <= 0) | (distance > self.config.max_span)
            columns = (~hidden & (unclamped <= 1)).any(dim=1).any(dim=1)  # [B, N]
            bias = torch.zeros_like(unclamped).masked_fill_(hidden, float("-inf"))
        index = selected_columns(columns)  # [B, C]
        ramp_age = age.gather(2, index.unsqueeze(1).expand(-1, age.shape[1], -1))  # [B, T, C]
        ramp = log_mask_bias(self.mask(ramp_age))
        return write_columns_(bias, index, ramp), index, ramp

    def after_optimizer_step(self) -> None:
        """Keep every span in ``[0, L]``."""
        with torch.no_grad():
            self.span_fraction.clamp_(0.0, 1.0)


class HeadSpanRule(DecodeRule):
    """One-token steps: the bias is ``log m_h`` of each head's ramp mask at the memory's age."""

    def __init__(self, policy: AdaptiveSpanPolicy) -> None:
        self.policy = policy

    def bias(self, kept: Tensor | None, age: Tensor) -> Tensor:
        return self.policy.mask(age.unsqueeze(1)).squeeze(2).log_()  # [B, H, N]; log 0 = -inf

    def alive(self, kept: Tensor | None, next_age: Tensor) -> Tensor:
        return self.policy.alive(next_age)
