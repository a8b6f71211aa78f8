"""Fused CPU attention whose additive bias gets its gradient only on a few key columns.

On CPU, ``scaled_dot_product_attention`` falls back to the materialising math path as soon as its
mask requires grad. Expire-Span's bias ``log m`` does, but the mask has a derivative only where it
is on its ramp (``0 < m <= 1`` before the clamp): elsewhere the key is hidden (``m = 0``, the bias
is ``-inf``) or fully kept (``m`` clamped at 1). In a block those entries fall on few key columns.
So the forward and the gradients of q, k, v use the fused flash kernel with the bias as a constant,
and the bias gradient ``dS = P * (dP - D)`` (with ``P = softmax``, ``dP = dO v^T``,
``D = rowsum(dO * O)``) is computed on the given columns only (``index`` from
:func:`~expire_span.policies.base.selected_columns`: rows selecting fewer are padded with other
columns, whose exact value does no harm) and handed to the differentiable values of those columns
(``[B, ., T, C]``), never to a ``[B, ., T, N]`` tensor. That is the true gradient through the mask
as long as the entries of unselected columns have a zero derivative downstream (the caller's
promise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class RampBiasAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + bias) v`` where only the key columns ``index`` of the bias
    carry a gradient, to their values ``columns``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor,
                columns: Tensor) -> Tensor:
        """``q`` ``[B, H, T, d]``, ``k``/``v`` ``[B, H, N, d]``, ``bias`` ``[B, 1 or H, T, N]``
        (every row with a finite entry; a constant that already holds ``columns``), ``index``
        ``[B, C]`` int64 (keys that may carry a bias gradient in some row), ``columns``
        ``[B, 1 or H, T, C]`` (the bias on those keys, differentiable)."""
        bias = bias.detach()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias
        )
        ctx.save_for_backward(q, k, v, bias, index, out, lse)
        ctx.column_dtype = columns.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, index, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias
        )
        dcolumns = None
        if ctx.needs_input_grad[5]:
            dcolumns = _column_grad(q, k, v, bias, index, out, lse, grad_out)
            dcolumns = dcolumns.to(ctx.column_dtype)
        return dq, dk, dv, None, None, dcolumns


def _column_grad(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor, out: Tensor,
                 lse: Tensor, grad_out: Tensor) -> Tensor:
    """``P * (dP - D)`` on the columns ``index`` (``[B, C]``): ``[B, 1 or H, T, C]``, summed
    over the heads a one-head bias is broadcast to. Keys are picked as whole rows of the
    ``[B, N, H, d]`` layout they were projected in, and every ``[B, H, T, C]`` step but the
    first works in place."""
    batch, heads, keys, head_dim = k.shape
    rows = (index + torch.arange(batch, device=index.device).unsqueeze(1) * keys).flatten()
    k_c, v_c = _key_rows(k, rows), _key_rows(v, rows)  # [B, H, C, d]
    by_entry = index[:, None, None, :].expand(-1, bias.shape[1], bias.shape[2], -1)
    scores = torch.matmul(q * head_dim**-0.5, k_c.transpose(-1, -2))  # [B, H, T, C]
    # exp takes a slow path at -inf (hidden keys) and where its result is subnormal, so
    # the exponent is floored: a probability below ~3e-38 (float32) becomes ~3e-38, which no sum
    # with a real probability can hold, and hidden entries' gradients are dropped downstream.
    floor = math.log(torch.finfo(scores.dtype).tiny) + 1.0
    probs = scores.add_(bias.gather(3, by_entry)).sub_(lse.unsqueeze(-1)).clamp_min_(floor).exp_()
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # [B, H, T, 1]
    grad_c = torch.matmul(grad_out, v_c.transpose(-1, -2)).sub_(delta).mul_(probs)
    if bias.shape[1] == 1 and heads > 1:
        grad_c = grad_c.sum(dim=1, keepdim=True)
    return grad_c


def _key_rows(x: Tensor, rows: Tensor) -> Tensor:
    """The ``rows`` (``[B * C]``, numbered in ``[B * N]``) of ``x`` (``[B, H, N, d]``, a view of
    the ``[B, N, H * d]`` projection) as ``[B, H, C, d]``: one ``index_select`` of whole rows,
    much faster than a ``gather`` with per-element indices."""
    batch, heads, keys, head_dim = x.shape
    picked = x.transpose(1, 2).reshape(batch * keys, heads * head_dim).index_select(0, rows)
    return picked.view(batch, -1, heads, head_dim).transpose(1, 2)


def ramp_bias_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor,
                        columns: Tensor) -> Tensor:
    """See :class:`RampBiasAttention`."""
    return RampBiasAttention.apply(q, k, v, bias, index, columns)
