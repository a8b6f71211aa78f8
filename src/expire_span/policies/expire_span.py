"""Expire-Span (Sukhbaatar et al., ICML 2021): every memory predicts how long it should live.

The whole method, per layer (memory i created at step i, query at step t):

- span: ``e_i = L * sigmoid(w . h_i / c + b)``, one predictor per layer shared by its heads, with
  ``w = 0`` and ``b = logit(p)`` at initialisation so every span starts at ``p * L``;
- remaining span ``r_ti = e_i - (t - i)`` and soft mask ``m_ti = clamp(1 + r_ti / R, 0, 1)``;
- attention ``softmax(s_ti + log m_ti)`` (the layer adds the bias returned here; m = 0 is -inf);
- auxiliary loss, ``span_loss="ramp"`` (the default, the released code's form), on (query,
  memory) pairs on the ramp only (0 < m < 1): ``alpha * sum (r_ti + R) / (R * T * B)``. Its
  gradient is the released code's (there the summed term is ``r_ti``; we add the constant R so the
  reported value is >= 0): every ramp pair pushes its memory's span down by ``alpha / (R T B)``,
  and a memory spends R queries on the ramp, so each memory is charged once per unit of span;
- ``span_loss="l1"`` (the paper's form): ``alpha * sum_i e_i / (T * B)`` over the block's own T
  new states, so every memory is charged exactly once per unit of span, in the block that makes
  it, whether or not it ever reaches its ramp (one alpha means the same pressure in both forms);
- random span shortening (``noisy``, training only): one ``u ~ U(0, 1)`` per block and
  ``e_i <- min(e_i, u L)`` for the mask and the loss;
- memory i is deleted once no future query can see it, i.e. when ``m`` at the next block's first
  query is 0 (``e_i - (t_next - i) <= -R``). With ``prune_expired=False`` memories are only masked,
  and dropped once older than ``L + R`` steps, where no span can reach.

Spans are recomputed every block from the stored hidden states, so gradients reach ``w`` and ``b``
through the mask (task loss) and through the auxiliary loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.policies.base import (
    PROBE_BIAS,
    PROBE_WEIGHT,
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


def ramp_loss(mask: Tensor, valid: Tensor) -> Tensor:
    """``sum (r + R) / R`` over the (query, memory) pairs on the ramp, computed as ``sum m``
    over pairs with ``m < 1``: on the ramp ``r + R = R m``, expired pairs add 0, and future keys
    (``r > 0``) and the query itself have ``m = 1``. ``valid`` (``[B, 1, N]``) drops padding; any
    subset of columns holding every pair with ``0 < m < 1`` gives the same sum."""
    return torch.where(valid & (mask < 1), mask, torch.zeros_like(mask)).sum()


def new_span_sum(spans: Tensor, context: BlockContext) -> Tensor:
    """``sum_i e_i`` over the block's own states (the last T entries of the context, padding
    excluded): each memory enters this sum once, in the block that produces it."""
    queries = context.num_queries
    valid = context.states.valid[:, -queries:]
    return torch.where(valid, spans[:, -queries:], torch.zeros_like(spans[:, -queries:])).sum()


class SpanPredictor(nn.Linear):
    """``e = L * sigmoid(w . h / c + b)`` for states ``h`` (``[B, N, D]`` -> ``[B, N]``); ``c``
    (``pre_div``) divides ``w . h``, not the ``[B, N, D]`` states. Starts with ``w = 0`` and
    ``b = logit(p)``, so that every span is ``p * L``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.d_model, 1)
        self.max_span, self.pre_div = config.max_span, config.pre_div
        nn.init.zeros_(self.weight)
        p = config.init_percentage
        nn.init.constant_(self.bias, math.log(p) - math.log1p(-p))

    def forward(self, inputs: Tensor) -> Tensor:
        logits = F.linear(inputs, self.weight).squeeze(-1)
        if self.pre_div != 1.0:
            logits = logits / self.pre_div
        return self.max_span * torch.sigmoid(logits + self.bias)


class ExpireSpanPolicy(MemoryPolicy):
    name = "expire-span"
    aux_loss_forgets = True

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.span_predictor = SpanPredictor(config)

    @property
    def lr_scale(self) -> float:
        return self.config.span_lr_scale

    def spans(self, inputs: Tensor) -> Tensor:
        """``[B, N]`` expire-spans of the given states (:class:`SpanPredictor`)."""
        return self.span_predictor(inputs)

    def decide(self, context: BlockContext) -> MaskDecision:
        cfg = self.config
        spans = self.spans(context.inputs)
        masked_spans = spans
        if cfg.noisy and self.training:
            limit = context.block_uniform * cfg.max_span
            masked_spans = spans.clamp(max=limit)
        keep = self._keep(context, spans)
        flex = None
        if context.flex:  # FlexAttention computes the mask from the spans: no [B, T, N] bias
            ages = key_ages(context.states.steps, context.states.valid,
                            context.next_step - context.num_queries)
            flex = SpanMask(ages, masked_spans, float(cfg.ramp))
            bias, columns = None, self._ramp_keys(masked_spans.detach(), ages, context.num_queries)
        elif not torch.is_grad_enabled():  # nothing learns through the mask: every column at once
            mask = ramp_mask(masked_spans.unsqueeze(1) - context.age, cfg.ramp)
            aux = self._aux_loss(masked_spans, mask, context.states.valid.unsqueeze(1), context)
            return MaskDecision(bias=log_mask_bias(mask).unsqueeze(1), aux_loss=aux, keep=keep)
        else:
            grace = self._grace()
            bias, columns = self._constant_bias(masked_spans.detach(), context.age, grace)
        # Only entries on the ramp have a derivative; they lie in few key columns, so the mask
        # (and the loss) is differentiated on those columns only, the rest being constant.
        index = selected_columns(columns)  # [B, C]
        by_entry = index.unsqueeze(1).expand(-1, context.num_queries, -1)  # [B, T, C]
        remaining = masked_spans.gather(1, index).unsqueeze(1) - context.age.gather(2, by_entry)
        mask = ramp_mask(remaining, cfg.ramp)
        column_bias = None
        if bias is not None:
            column_bias = log_mask_bias(mask)
            if grace:
                column_bias = probe_expired(column_bias, remaining, cfg.ramp, grace,
                                            self.aux_weight)
            column_bias = column_bias.unsqueeze(1)  # [B, 1, T, C]
            bias = write_columns_(bias.unsqueeze(1), index, column_bias)
        valid = context.states.valid.gather(1, index).unsqueeze(1)
        aux = self._aux_loss(masked_spans, mask, valid, context)
        return MaskDecision(bias=bias, aux_loss=aux, keep=keep, bias_grad_index=index,
                            bias_columns=column_bias, flex=flex)

    def _aux_loss(self, spans: Tensor, mask: Tensor, valid: Tensor,
                  context: BlockContext) -> Tensor:
        """The auxiliary loss of the block in the configured form (``span_loss``), from the
        (possibly shortened) spans, or from the mask on a set of columns holding every ramp pair
        and their ``valid`` flags (``[B, 1, C]``)."""
        batch, queries = context.age.shape[:2]
        if self.config.span_loss == "l1":
            return self.config.alpha * new_span_sum(spans, context) / (queries * batch)
        return self.config.alpha * ramp_loss(mask, valid) / (queries * batch)

    def _ramp_keys(self, spans: Tensor, ages: Tensor, queries: int) -> Tensor:
        """``[B, N]``: the keys some query of the block may see on the ramp (``0 < m <= 1``),
        from the spans and the ages at the first query alone (a superset, by one step each
        side: the ramp loss and the mask's gradient are the same on any superset)."""
        with torch.no_grad():
            remaining = spans - ages.float()  # r at the first query; the last one sees r - T + 1
            return (remaining - (queries - 1) <= 1.0) & (remaining > -self.config.ramp - 1.0)

    def _constant_bias(self, spans: Tensor, age: Tensor, grace: int) -> tuple[Tensor, Tensor]:
        """``[B, T, N]`` bias, exact where the mask is 1 (0) or 0 (``-inf``), and the ``[B, N]``
        columns with an entry in between, where the mask has a derivative: ``u = 1 + r / R`` in
        ``(0, 1]`` (the clamp passes the gradient at 1), computed by :func:`ramp_mask`'s
        expression. ``u`` falls with the query's age, so a column has such an entry iff ``u > 0``
        at its first query and ``u <= 1`` at its last (for ``R >= 1``, a superset otherwise);
        every other column is one constant, 0 or ``-inf``: the bias is built from ``[B, N]``
        values, not from ``[B, T, N]`` arithmetic. With a ``grace`` of G steps the columns with
        an entry in ``(-G / R, 0]`` (:func:`probe_expired`) are selected too."""
        with torch.no_grad():
            first, last = (1.0 + (spans - age[:, row]) / self.config.ramp for row in (0, -1))
            columns = (first > -grace / self.config.ramp) & (last <= 1)
            key_bias = torch.zeros_like(first).masked_fill_(first <= 0, float("-inf"))
            bias = key_bias.unsqueeze(1).expand(age.shape).contiguous()
        return bias, columns

    def _grace(self) -> int:
        """The grace in effect: probes only in training and only while the span loss acts (held,
        nothing is probed or kept for probes, so the run is the one without grace)."""
        return self.config.grace if self.training and self.aux_weight > 0 else 0

    def _keep(self, context: BlockContext, spans: Tensor) -> Tensor:
        """Entries some future query can still attend (by the true, not the noisy, spans), and
        those it may probe (:meth:`_grace`)."""
        return _alive(self.config, spans, context.next_step - context.states.steps,
                      self._grace())

    def decode_rule(self) -> DecodeRule:
        return SpanRule(self)


def _alive(config: ModelConfig, spans: Tensor, next_age: Tensor, grace: int = 0) -> Tensor:
    """Memories of ``spans`` that a query ``next_age`` steps on can still attend, or, with a
    ``grace`` of G steps, probe (kept G steps past the ramp, hidden wherever not probed)."""
    reach = config.ramp + grace
    if not config.prune_expired:
        return next_age < config.max_span + reach
    with torch.no_grad():  # m > 0 at the next query <=> r > -R (float-safe: keeps, never drops)
        return spans - next_age > -reach


def probe_expired(bias: Tensor, remaining: Tensor, ramp: int, grace: int,
                  strength: float = 1.0) -> Tensor:
    """``bias`` (``log m``) with the entries expired less than ``grace`` steps ago made probes.

    The mask ``m = clamp(u, 0, 1)``, ``u = 1 + r / R``, has no derivative once ``u <= 0``: a
    memory the span loss pushed just past the query that needs it gets no gradient back. On the
    ramp the loss's derivative in ``u`` is ``dL/du = exp(s - lse) (dP - D)`` (the attention
    gradient ``P (dP - D)`` divided by ``m``), which does not vanish as ``m -> 0``. A probe entry
    (``-G / R < u <= 0``) takes the bias ``log eps`` (``eps = PROBE_WEIGHT``, 1e-12: below
    float32's resolution next to any read) with derivative ``1 / eps`` in ``u``, so it receives
    that same ``dL/du``, the derivative of the mask's continuation below 0: whether reopening
    the memory would lower the loss, times ``strength`` (the span loss's weight: the probes
    counter what that loss overshoots; while it is held they would only lengthen every span).
    Only the spans learn from it."""
    unit = 1.0 + remaining / ramp
    probe = (unit > -grace / ramp) & (unit <= 0)
    straight_through = PROBE_BIAS + (unit - unit.detach()) * (strength / PROBE_WEIGHT)
    return torch.where(probe, straight_through, bias)


class SpanRule(DecodeRule):
    """One-token steps: each memory's span is predicted once, when it is made, and kept beside
    it; the bias is ``log m`` of the ramp mask from the span and the age (the same mask as
    :meth:`ExpireSpanPolicy.decide` in inference, where spans are recomputed from the same
    states)."""

    def __init__(self, policy: ExpireSpanPolicy) -> None:
        self.config, predictor = policy.config, policy.span_predictor
        self.projection = predictor.weight / predictor.pre_div
        self.offset = predictor.bias

    def kept(self, projected: Tensor) -> Tensor:
        return torch.sigmoid(projected.squeeze(-1) + self.offset).mul_(self.config.max_span)

    def bias(self, kept: Tensor | None, age: Tensor) -> Tensor:
        assert kept is not None
        remaining = kept - age
        return ramp_mask(remaining, self.config.ramp).log_().unsqueeze(1)  # log 0 = -inf

    def alive(self, kept: Tensor | None, next_age: Tensor) -> Tensor:
        assert kept is not None
        return _alive(self.config, kept, next_age)
