"""Multi-head attention over [memory; block] with rotary positions at absolute steps.

Rotary embeddings (RoPE) rotate each query and key by an angle proportional to its absolute step,
so a score depends only on the distance between the two steps. Distances therefore stay right
however many memories were removed in between, and no position table bounds the span.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.model.flex_attention import FlexPlan, flex_attend
from expire_span.model.ramp_attention import ramp_bias_attention
from expire_span.policies.base import scatter_columns

Rotation = tuple[Tensor, Tensor]
"""A rotary table: full-width cos and signed sin, ``[..., N, 1, d]``
(:meth:`RotaryEmbedding.tables`)."""


class RotaryEmbedding(nn.Module):
    """Rotates channel pairs ``(x[:d/2], x[d/2:])`` by ``step * base^(-2k/d)``.

    Angles are computed as ``(step * frequency) mod 2 pi`` in float64, then cos and sin in
    float32 (float64 for a float64 model, so that it can be checked against a float64 reference
    to rounding): exact at any absolute step (a float32 product would lose the angle beyond a few
    thousand steps), so keys can be rotated once, at their own step, and cached.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.register_buffer("inv_freq", base**-exponents, persistent=False)

    def tables(self, steps: Tensor, dtype: torch.dtype) -> Rotation:
        """The rotation at int64 ``steps`` (``[N]`` or ``[B, N]``): full-width
        ``([cos, cos], [-sin, sin])``, ``[..., N, 1, d]``. A block's table serves every layer."""
        angles = steps.unsqueeze(-1).double() * self.inv_freq
        work = torch.float64 if dtype == torch.float64 else torch.float32
        angles = torch.remainder(angles, 2 * math.pi).to(work).unsqueeze(-2)  # [..., N, 1, d/2]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    @staticmethod
    def rotate(x: Tensor, rotation: Rotation) -> Tensor:
        """``x`` (``[..., N, H, d]``) rotated: ``x [cos, cos] + (x2, x1) [-sin, sin]``, i.e.
        ``(x1 cos - x2 sin, x1 sin + x2 cos)``, in three tensor operations instead of seven."""
        cos, sin = (table.to(x.dtype) for table in rotation)  # autocast: x may be narrower
        first, second = x.chunk(2, dim=-1)
        return torch.addcmul(x * cos, torch.cat([second, first], dim=-1), sin)

    def forward(self, x: Tensor, steps: Tensor) -> Tensor:
        """``x``: ``[..., N, H, d]``; ``steps``: int64 ``[N]`` or ``[B, N]`` absolute steps."""
        return self.rotate(x, self.tables(steps, x.dtype))


class MultiHeadAttention(nn.Module):
    """Queries from the block, keys and values from [memory; block], plus an additive bias."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.d_model, config.d_model, bias=False)
        self.key_value = nn.Linear(config.d_model, 2 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base)
        self.dropout = config.dropout
        self.fused = config.attention in ("auto", "sdpa", "flex")  # flex falls back to sdpa

    def _split(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, N, H, d]``."""
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, H, N, d]``."""
        return self._split(x).transpose(1, 2)

    def keys_values(self, key_inputs: Tensor, key_steps: Tensor,
                    rotation: Rotation | None = None) -> Tensor:
        """``[B, N, 2 D]``: keys rotated at their absolute steps (``[B, N]``; ``rotation``: their
        table, when the caller has it), then values."""
        keys, values = self.key_value(key_inputs).chunk(2, dim=-1)
        if rotation is None:
            rotation = self.rotary.tables(key_steps, keys.dtype)
        keys = self.rotary.rotate(self._split(keys), rotation).flatten(-2)
        return torch.cat([keys, values], dim=-1)

    def forward(
        self,
        query_inputs: Tensor,
        query_steps: Tensor,
        key_values: Tensor,
        bias: Tensor | None,
        bias_grad_index: Tensor | None = None,
        bias_columns: Tensor | None = None,
        query_rotation: Rotation | None = None,
        flex: FlexPlan | None = None,
    ) -> Tensor:
        """Attend.

        Args:
            query_inputs: ``[B, T, D]``.
            query_steps: ``[T]`` int64 absolute steps of the queries.
            key_values: ``[B, N, 2 D]`` from :meth:`keys_values`.
            bias: ``[B, 1 or H, T, N]`` additive scores (``-inf`` hides a key).
            bias_grad_index: ``[B, C]`` int64, optional: the only keys whose bias entries have a
                nonzero derivative downstream (see :class:`~expire_span.policies.MaskDecision`).
            bias_columns: ``[B, 1 or H, T, C]``, optional: the differentiable bias on those keys
                (``bias`` is then constant and already holds their values).
            query_rotation: the rotary table of ``query_steps``, when the caller has it.
            flex: the mask for FlexAttention (``model/flex_attention.py``), used instead of
                ``bias`` (then ``None``).

        Returns:
            ``[B, T, D]``.
        """
        if query_rotation is None:
            query_rotation = self.rotary.tables(query_steps, query_inputs.dtype)
        q = self.rotary.rotate(self._split(self.query(query_inputs)), query_rotation)
        q = q.transpose(1, 2)
        keys, values = key_values.chunk(2, dim=-1)
        k, v = self._heads(keys), self._heads(values)
        dropout = self.dropout if self.training else 0.0
        if flex is not None:
            out = flex_attend(q, k, v, flex, dropout)
        elif (self.fused and bias_columns is not None and bias_columns.requires_grad
                and dropout == 0.0 and q.device.type == "cpu"):
            # CPU SDPA would take its math path for a bias requiring grad: fused, columns only.
            assert bias is not None and bias_grad_index is not None
            out = ramp_bias_attention(q, k, v, bias.to(q.dtype), bias_grad_index,
                                      bias_columns.to(q.dtype))
        else:
            if bias_columns is not None:
                assert bias is not None and bias_grad_index is not None
                bias = scatter_columns(bias, bias_grad_index, bias_columns)
            if self.fused:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                                     dropout_p=dropout)
            else:
                out = dense_attention(q, k, v, bias, dropout)
        return self.out(self._merge(out))

    def _merge(self, heads: Tensor) -> Tensor:
        """``[B, H, T, d]`` -> ``[B, T, H * d]``."""
        batch, _, length, _ = heads.shape
        return heads.transpose(1, 2).reshape(batch, length, -1)

    def readout(self, query_inputs: Tensor, key_inputs: Tensor, key_valid: Tensor) -> Tensor:
        """Content-only attention with the projection weights detached.

        ``softmax(q k^T / sqrt(d)) v`` per head, heads concatenated (no positions, no output
        projection, no dropout); ``key_valid`` (``[B, N]`` bool) hides keys. Gradients reach the
        inputs but never the weights, so an auxiliary loss measured through it cannot train (or
        freeze) the attention. See :data:`expire_span.policies.base.Readout`.
        """
        q = self._heads(F.linear(query_inputs, self.query.weight.detach()))
        keys, values = F.linear(key_inputs, self.key_value.weight.detach()).chunk(2, dim=-1)
        hidden = torch.zeros_like(key_valid, dtype=q.dtype).masked_fill(~key_valid, -math.inf)
        bias = hidden[:, None, None, :]
        return self._merge(dense_attention(q, self._heads(keys), self._heads(values), bias, 0.0))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, dropout: float) -> Tensor:
    """The reference: ``softmax(q k^T / sqrt(d) + bias) v``, every tensor materialised."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)  # [B, H, T, d]
