"""Fused CPU attention whose additive bias gets its gradient only on a few key columns.

On CPU, ``scaled_dot_product_attention`` falls back to the materialising math path as soon as its
mask requires grad. Expire-Span's bias ``log m`` does, but the mask has a derivative only where it
is on its ramp (``0 < m <= 1`` before the clamp): elsewhere the key is hidden (``m = 0``, the bias
is ``-inf``) or fully kept (``m`` clamped at 1). In a block those entries fall on few key columns.
So the forward and the gradients of q, k, v use the fused flash kernel with the bias as a constant,
and the bias gradient ``dS = P * (dP - D)`` (with ``P = softmax``, ``dP = dO v^T``,
``D = rowsum(dO * O)``) is computed on the given columns only (``index`` from
:func:`~expire_span.policies.base.selected_columns`: rows selecting fewer are padded with other
columns, whose exact value does no harm); it is 0 on the remaining ones. That is the true
gradient through the mask as long as the entries of unselected columns have a zero derivative
downstream (the caller's promise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class RampBiasAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + bias) v`` with the bias gradient restricted to the key
    columns ``index``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor
                ) -> Tensor:
        """``q`` ``[B, H, T, d]``, ``k``/``v`` ``[B, H, N, d]``, ``bias`` ``[B, 1 or H, T, N]``
        (every row with a finite entry), ``index`` ``[B, C]`` int64 (keys that may carry a bias
        gradient in some row)."""
        bias = bias.detach()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias
        )
        ctx.save_for_backward(q, k, v, bias, index, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, index, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias
        )
        dbias = None
        if ctx.needs_input_grad[3]:
            dbias = _bias_grad(q, k, v, bias, index, out, lse, grad_out)
        return dq, dk, dv, dbias, None


def _bias_grad(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor, out: Tensor,
               lse: Tensor, grad_out: Tensor) -> Tensor:
    """``P * (dP - D)`` on the columns ``index`` (``[B, C]``), scattered into zeros and summed
    over broadcast heads."""
    head_dim = q.shape[-1]
    by_key = index[:, None, :, None].expand(-1, k.shape[1], -1, head_dim)
    k_c, v_c = k.gather(2, by_key), v.gather(2, by_key)  # [B, H, C, d]
    by_entry = index[:, None, None, :].expand(-1, bias.shape[1], bias.shape[2], -1)
    bias_c = bias.gather(3, by_entry)  # [B, 1 or H, T, C]
    scores = torch.matmul(q, k_c.transpose(-1, -2)) * head_dim**-0.5 + bias_c
    probs = torch.exp(scores - lse.unsqueeze(-1))
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # [B, H, T, 1]
    grad_c = probs * (torch.matmul(grad_out, v_c.transpose(-1, -2)) - delta)
    if bias.shape[1] == 1:
        grad_c = grad_c.sum(dim=1, keepdim=True)
    return torch.zeros_like(bias).scatter_(3, by_entry, grad_c.to(bias.dtype))


def ramp_bias_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, index: Tensor
                        ) -> Tensor:
    """See :class:`RampBiasAttention`."""
    return RampBiasAttention.apply(q, k, v, bias, index)
