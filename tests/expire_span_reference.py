"""A naive dense Expire-Span written from the formulas of SPEC.md section 2, for the tests.

Nothing here calls the library's forward code: it reads a :class:`MemoryTransformer`'s parameters
and recomputes the model the slow, obvious way. It keeps every past hidden state of every layer
(no cache, no pruning, no ramp columns, no fused kernels) and, per query, takes the softmax over
all causally visible keys, multiplies it by the soft mask ``m`` and renormalises. The auxiliary
loss is the released ramp form. With ``grace`` (training), a mask entry expired less than G steps
ago is 0 with the derivative of ``1 + r / R``: in this multiplicative form the loss's derivative
in ``m`` at ``m = 0`` is what the library's probes must reproduce. What the library may do
differently (delete memories, attend only some columns, skip work) must not change a single
number beyond rounding.

Architecture facts it shares with the library by definition (they are the model, not the
method): rotary positions at absolute steps rotating the channel pairs ``(x[k], x[k + d/2])`` by
``step * base^(-2k/d)``, a GELU feed-forward, LayerNorm (eps 1e-5), pre- or post-norm residuals,
and spans predicted from the states the keys are computed from (normalised under pre-norm, as in
the authors' release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from expire_span import MemoryTransformer


def layer_norm(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, D]`` -> ``[B, N, H, D / H]``."""
    return x.view(*x.shape[:2], heads, x.shape[-1] // heads)


def feed_forward(x: Tensor, layers: torch.nn.Sequential) -> Tensor:
    """``W2 gelu(W1 x + b1) + b2`` with the weights of the library's (Linear, GELU, Dropout,
    Linear)."""
    first, second = layers[0], layers[3]
    return torch.nn.functional.gelu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias


def rotate(x: Tensor, steps: Tensor, base: float) -> Tensor:
    """``x`` ``[B, N, H, d]`` at absolute ``steps`` ``[N]``: each pair ``(x[k], x[k + d/2])``
    turned by the angle ``step * base^(-2k/d)``."""
    half = x.shape[-1] // 2
    frequency = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = (steps.double()[:, None] * frequency).to(x.dtype)[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * angle.cos() - second * angle.sin(),
                      first * angle.sin() + second * angle.cos()], dim=-1)


def soft_mask(spans: Tensor, age: Tensor, ramp: float) -> Tensor:
    """``m = clamp(1 + (e - age) / R, 0, 1)``; ``spans`` ``[B, N]``, ``age`` ``[T, N]``."""
    return (1 + (spans[:, None, :] - age[None]) / ramp).clamp(0, 1)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, visible: Tensor) -> Tensor:
    """Per query: softmax of the scores over all ``visible`` keys, times ``mask``, renormalised
    (SPEC: ``a = m softmax(s) / sum m softmax(s)``). ``q`` ``[B, H, T, d]``, ``k``/``v``
    ``[B, H, N, d]``, ``mask`` ``[B, T, N]``, ``visible`` ``[T, N]`` bool."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1) * mask[:, None]
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ v


@dataclass
class ReferenceExpireSpan:
    """Reads a stream call by call like the library (each call cut into blocks of
    ``block_len``), with its own full history of every layer's input states (detached)."""

    model: MemoryTransformer
    history: list[Tensor] = field(default_factory=list)
    next_step: int = 0

    def __call__(self, tokens: Tensor, uniforms: list[float] | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Logits ``[B, T, V]`` and the call's auxiliary loss (mean per query: each block's
        weighted by its share of the call). ``uniforms``: the noise draw ``u`` of each block of
        this call (noisy training), one for all layers of a block."""
        block_len = self.model.config.block_len
        blocks = tokens.split(block_len, dim=1)
        uniforms = uniforms if uniforms is not None else [None] * len(blocks)
        logits, aux = [], tokens.new_zeros((), dtype=self.model.head.weight.dtype)
        for block, u in zip(blocks, uniforms, strict=True):
            block_logits, block_aux = self._block(block, u)
            logits.append(block_logits)
            aux = aux + block_aux * (block.shape[1] / tokens.shape[1])
        return torch.cat(logits, dim=1), aux

    def _block(self, tokens: Tensor, u: float | None) -> tuple[Tensor, Tensor]:
        model, cfg = self.model, self.model.config
        batch, length = tokens.shape
        if not self.history:
            self.history = [model.embedding.weight.new_zeros(batch, 0, cfg.d_model)
                            for _ in model.layers]
        start = self.next_step
        steps = torch.arange(start + length)  # every step so far: nothing is ever deleted
        age = steps[start:, None] - steps[None, :]  # [T, N], query minus key
        visible = age >= 0
        hidden = model.embedding.weight[tokens]
        aux = hidden.new_zeros(())
        for index, layer in enumerate(model.layers):
            states = torch.cat([self.history[index], hidden], dim=1)  # [B, N, D]
            self.history[index] = states.detach()
            inputs = layer_norm(states, layer.norm_attention) if cfg.pre_norm else states
            q = split_heads(inputs[:, -length:] @ layer.attention.query.weight.T, cfg.n_heads)
            keys, values = (inputs @ layer.attention.key_value.weight.T).chunk(2, dim=-1)
            q = rotate(q, steps[start:], cfg.rope_base).transpose(1, 2)
            k = rotate(split_heads(keys, cfg.n_heads), steps, cfg.rope_base).transpose(1, 2)
            v = split_heads(values, cfg.n_heads).transpose(1, 2)

            predictor = layer.policy.span_predictor
            logit = (inputs / cfg.pre_div) @ predictor.weight[0] + predictor.bias[0]
            spans = cfg.max_span * torch.sigmoid(logit)  # e_i = L sigmoid(w . h_i / c + b)
            if u is not None:  # random span shortening: e <- min(e, u L), mask and loss
                spans = spans.clamp(max=u * cfg.max_span)
            mask = soft_mask(spans, age, cfg.ramp) * visible
            on_ramp = visible & (mask > 0) & (mask < 1)
            remaining = spans[:, None, :] - age[None]  # r = e - (t - i)
            if cfg.grace:  # expired less than G steps ago: weight 0, derivative 1 in 1 + r / R
                unit = 1 + remaining / cfg.ramp
                probe = visible & (unit <= 0) & (unit > -cfg.grace / cfg.ramp)
                mask = torch.where(probe, unit - unit.detach(), mask)
            aux = aux + cfg.alpha * torch.where(on_ramp, remaining + cfg.ramp, 0.0).sum() / (
                cfg.ramp * length * batch)

            attended = masked_attention(q, k, v, mask, visible)
            attended = attended.transpose(1, 2).reshape(batch, length, cfg.d_model)
            attended = attended @ layer.attention.out.weight.T
            ff = layer.feed_forward
            if cfg.pre_norm:
                hidden = hidden + attended
                hidden = hidden + feed_forward(layer_norm(hidden, layer.norm_feed_forward), ff)
            else:
                hidden = layer_norm(hidden + attended, layer.norm_attention)
                hidden = layer_norm(hidden + feed_forward(hidden, ff), layer.norm_feed_forward)
        if cfg.pre_norm:
            hidden = layer_norm(hidden, model.norm_out)
        self.next_step += length
        return hidden @ model.head.weight.T, aux
