"""A one-token decode step: generation's inner loop without the block machinery.

Reading one token through :meth:`MemoryTransformer.forward` builds a block context per layer
(ages and visibility against every memory, the policy's ``[B, T, N]`` decision, the memory
update), about a hundred tensor operations per layer, each a few microseconds of dispatch: at
batch 1 that overhead, not attention, is the token's cost. :class:`Decoder` keeps, per layer,
append-only buffers of the memories' states, rotated keys and values (laid out as attention reads
them) and steps, plus the value the policy's :class:`~expire_span.policies.base.DecodeRule`
keeps beside each memory (Expire-Span: its span, predicted once); a token is then about thirty
operations per layer. Memories that expire stay in the buffers, hidden by the rule's bias, until
the buffers are full; they are then packed (dropping what the rule no longer keeps) into new
buffers twice as wide as what is kept, so a pack costs about one slot per token.

The outputs equal the general path's (tested): the same keys, the same mask, attention over a
superset whose extra entries have weight 0. :meth:`Decoder.memory` gives the
:class:`~expire_span.memory.Memory` the general path would hold at that point (without its
caches), so a generation can be continued by any call of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from expire_span.memory import LayerMemory, Memory
from expire_span.model.attention import dense_attention
from expire_span.model.transformer import MemoryTransformer, TransformerLayer
from expire_span.policies.base import DecodeRule

_TABLE_CHUNK = 1024
"""Steps whose rotary tables are computed at once (one table call per chunk of tokens)."""
_MIN_GROWTH = 64
"""Free slots a pack leaves at least, so that small memories are not packed every few tokens."""


@dataclass
class _Slots:
    """One layer's buffers (``[B, capacity, ...]``); slots ``[0, end)`` are written. The free
    tail's steps and validity are written ahead (every row reads one token per step), so a token
    writes only its state, key, value and kept value."""

    hidden: Tensor  # [B, C, D] raw layer inputs (what a Memory holds)
    keys: Tensor  # [B, H, C, d] rotated at their steps
    values: Tensor  # [B, H, C, d]
    steps: Tensor  # [B, C] int64
    valid: Tensor  # [B, C] bool (False: padding of a row that keeps fewer memories)
    kept: Tensor | None  # [B, C]: the rule's value per memory (Expire-Span: the span)
    end: int
    padded: bool  # some written slot is padding
    consecutive: bool  # every row holds the steps just before the next one, no padding

    @property
    def capacity(self) -> int:
        return self.hidden.shape[1]


def _allocate(hidden: Tensor, keys: Tensor, values: Tensor, steps: Tensor, valid: Tensor,
              kept: Tensor | None, next_step: int) -> _Slots:
    """New buffers holding these (``[B, W, ...]``, keys and values ``[B, H, W, d]``) at the
    front, with room for ``max(W, 64)`` more steps from ``next_step`` on."""
    width = hidden.shape[1]
    capacity = width + max(width, _MIN_GROWTH)

    def grown(value: Tensor, dim: int, tail: float | bool = 0) -> Tensor:
        shape = list(value.shape)
        shape[dim] = capacity
        buffer = value.new_full(shape, tail)
        buffer.narrow(dim, 0, width).copy_(value)
        return buffer

    ahead = torch.arange(next_step - width, next_step - width + capacity, device=steps.device)
    steps_buffer = ahead.expand(steps.shape[0], -1).clone()
    steps_buffer[:, :width] = steps
    padded = not bool(valid.all())
    consecutive = not padded and bool((steps == ahead[:width]).all())
    return _Slots(grown(hidden, 1), grown(keys, 2), grown(values, 2), steps_buffer,
                  grown(valid, 1, True), None if kept is None else grown(kept, 1), width,
                  padded, consecutive)


class _LayerStep:
    """One layer's weights arranged for one-token steps, its rule and its buffers."""

    def __init__(self, layer: TransformerLayer, memory: LayerMemory, rule: DecodeRule,
                 next_step: int) -> None:
        attention, feed_forward = layer.attention, layer.feed_forward
        self.layer, self.rule = layer, rule
        self.heads, self.head_dim = attention.n_heads, attention.head_dim
        self.width = width = attention.n_heads * attention.head_dim
        self.pre_norm = layer.config.pre_norm
        # One product gives the queries and keys, the same rotated by half (the rotary pairs
        # swapped within each head), and the values: the rotation is then two operations.
        half = self.head_dim // 2
        query_key = torch.cat([attention.query.weight, attention.key_value.weight[:width]])
        swapped = query_key.view(2, -1, 2, half, width).flip(2).reshape(2 * width, width)
        extra = [] if rule.projection is None else [rule.projection]  # the rule's kept value
        self.projection = torch.cat([query_key, swapped, attention.key_value.weight[width:],
                                     *extra]).t()
        self.out = attention.out.weight.t()
        self.inner = (feed_forward[0].weight.t(), feed_forward[0].bias)
        self.outer = (feed_forward[3].weight.t(), feed_forward[3].bias)
        self.gelu = feed_forward[1].approximate
        self.norms = [(norm.weight, norm.bias, norm.eps)
                      for norm in (layer.norm_attention, layer.norm_feed_forward)]
        if memory.cached_width(layer._kv_version()) == memory.width:  # the inference cache
            assert memory.inputs is not None and memory.kv is not None
            inputs, kv = memory.inputs, memory.kv
        else:
            inputs = self._norm(0, memory.hidden) if self.pre_norm else memory.hidden
            kv = attention.keys_values(inputs, memory.steps)
        keys, values = (self._heads(x) for x in kv.chunk(2, dim=-1))
        kept = None if rule.projection is None else rule.kept(F.linear(inputs, rule.projection))
        self.slots = self._pack(memory.hidden, keys, values, memory.steps, memory.valid, kept,
                                next_step)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def _norm(self, index: int, hidden: Tensor) -> Tensor:
        weight, bias, eps = self.norms[index]
        return F.layer_norm(hidden, (self.width,), weight, bias, eps)

    def _pack(self, hidden: Tensor, keys: Tensor, values: Tensor, steps: Tensor, valid: Tensor,
              kept: Tensor | None, next_step: int) -> _Slots:
        """New buffers holding what the rule keeps for a query at ``next_step``, packed left."""
        keep = valid & self.rule.alive(kept, next_step - steps)
        counts = keep.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        if not bool((counts == keep.shape[1]).all()):  # pack left (nothing to drop: as is)
            order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
            rows = torch.arange(order.shape[0], device=order.device).unsqueeze(1)
            hidden, steps = hidden[rows, order], steps[rows, order]
            keys, values = (x[rows, :, order].transpose(1, 2) for x in (keys, values))
            kept = None if kept is None else kept[rows, order]
            keep = torch.arange(width, device=order.device) < counts.unsqueeze(1)
        return _allocate(hidden, keys, values, steps, keep, kept, next_step)

    def _repack(self, step: int) -> _Slots:
        slots = self.slots
        kept = None if slots.kept is None else slots.kept[:, :slots.end]
        return self._pack(slots.hidden[:, :slots.end], slots.keys[:, :, :slots.end],
                          slots.values[:, :, :slots.end], slots.steps[:, :slots.end],
                          slots.valid[:, :slots.end], kept, step)

    def __call__(self, hidden: Tensor, step: int, cos: Tensor, sin: Tensor) -> Tensor:
        """The layer on one token ``hidden`` (``[B, D]``) at absolute ``step``; ``cos`` and
        ``sin`` (``[2 D]``) its rotary table for the queries and keys of every head."""
        slots = self.slots
        if slots.end == slots.capacity:
            slots = self.slots = self._repack(step)
        batch, width, slot = hidden.shape[0], self.width, slots.end
        inputs = self._norm(0, hidden) if self.pre_norm else hidden
        projected = torch.mm(inputs, self.projection)  # [B, 5 D]
        rotated = torch.addcmul(projected[:, :2 * width] * cos, projected[:, 2 * width:4 * width],
                                sin)  # queries and keys
        slots.keys[:, :, slot] = rotated[:, width:].view(batch, self.heads, self.head_dim)
        slots.values[:, :, slot] = projected[:, 4 * width:5 * width].view(
            batch, self.heads, self.head_dim)
        slots.hidden[:, slot] = hidden
        if slots.kept is not None:
            slots.kept[:, slot] = self.rule.kept(projected[:, 5 * width:])
        end = slots.end = slot + 1
        window = self.rule.window
        if window is not None and slots.consecutive:  # the window is the last slots
            lo, bias = max(0, end - window - 1), None
        else:
            lo, bias = 0, self._bias(slots, step, end, hidden.dtype)
        query = rotated[:, :width].view(batch, self.heads, 1, self.head_dim)
        attended = self._attend(query, slots.keys[:, :, lo:end], slots.values[:, :, lo:end], bias)
        attended = attended.view(batch, width)
        if self.pre_norm:
            hidden = torch.addmm(hidden, attended, self.out)
            return torch.addmm(hidden, self._inner(self._norm(1, hidden)), self.outer[0]).add_(
                self.outer[1])
        hidden = self._norm(0, torch.addmm(hidden, attended, self.out))
        return self._norm(1, torch.addmm(hidden, self._inner(hidden), self.outer[0]).add_(
            self.outer[1]))

    def _inner(self, hidden: Tensor) -> Tensor:
        weight, bias = self.inner
        return F.gelu(torch.addmm(bias, hidden, weight), approximate=self.gelu)

    def _bias(self, slots: _Slots, step: int, end: int, dtype: torch.dtype) -> Tensor:
        """``[B, 1 or H, 1, N]``: the rule's bias over slots ``[0, end)``, padding hidden (a
        window rule's, when its rows are not consecutive, from :meth:`DecodeRule.alive`)."""
        age = step - slots.steps[:, :end]
        kept = None if slots.kept is None else slots.kept[:, :end]
        bias = self.rule.bias(kept, age)
        if bias is None:
            hidden = ~(slots.valid[:, :end] & self.rule.alive(kept, age))
            bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
            return bias.masked_fill_(hidden, -math.inf)[:, None, None]
        if slots.padded:
            bias = bias.masked_fill(~slots.valid[:, None, :end], -math.inf)
        return bias.unsqueeze(2)

    def _attend(self, query: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None
                ) -> Tensor:
        if self.layer.attention.fused:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)
        zero = query.new_zeros(())
        return dense_attention(query, keys, values, zero if bias is None else bias, 0.0)

    def frozen(self) -> tuple[_Slots, int]:
        """The buffers and the written width now: the slots below it are never rewritten (new
        tokens go after them, packs go to new buffers), so they describe this moment later."""
        return self.slots, self.slots.end

    def memory(self, frozen: tuple[_Slots, int], next_step: int) -> LayerMemory:
        """The general path's memory at a :meth:`frozen` moment, ``next_step`` the step after it:
        the entries the rule keeps (the others marked invalid), copied."""
        slots, end = frozen
        lo = 0
        if self.rule.window is not None and slots.consecutive:
            lo = max(0, end - self.rule.window)
        steps, valid = slots.steps[:, lo:end], slots.valid[:, lo:end]
        kept = None if slots.kept is None else slots.kept[:, lo:end]
        keep = valid & self.rule.alive(kept, next_step - steps)
        return LayerMemory(slots.hidden[:, lo:end].clone(), steps.clone(), keep)


class Decoder:
    """Reads a stream one token per call, from a memory the model made (see the module doc).

    Build it with :meth:`build`; :meth:`step` returns the next-token logits; :meth:`memory` the
    memory after everything read so far. The weights are read when it is built: a decoder
    serves one generation, not a model that is trained meanwhile.
    """

    def __init__(self, model: MemoryTransformer, memory: Memory,
                 rules: list[DecodeRule]) -> None:
        self.model = model
        self.next_step = memory.next_step
        self.layers = [_LayerStep(layer, layer_memory, rule, memory.next_step)
                       for layer, layer_memory, rule in zip(model.layers, memory.layers, rules,
                                                            strict=True)]
        self._tables: tuple[int, Tensor, Tensor] | None = None
        self.head = model.head.weight.t()

    @classmethod
    def build(cls, model: MemoryTransformer, memory: Memory) -> Decoder | None:
        """A decoder continuing from ``memory``, or ``None`` where the one-token step does not
        apply: training mode, gradients enabled, or a policy without a decode rule (its memory
        holding more than states, e.g. Compressive's)."""
        if model.training or torch.is_grad_enabled():
            return None
        rules = [layer.policy.decode_rule() for layer in model.layers]
        if any(rule is None for rule in rules) or any(
                type(layer) is not LayerMemory for layer in memory.layers):
            return None
        return cls(model, memory, rules)  # type: ignore[arg-type]

    def _rotation(self, step: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The rotary table at ``step`` for the queries and keys of every head (``[2 D]`` cos
        and signed sin), from tables computed a chunk of steps at a time."""
        if self._tables is None or not 0 <= step - self._tables[0] < _TABLE_CHUNK:
            steps = torch.arange(step, step + _TABLE_CHUNK, device=self.model.device)
            tiles = 2 * self.model.config.n_heads  # [chunk, 1, d] -> [chunk, 2 H d]
            cos, sin = (table.expand(-1, tiles, -1).reshape(_TABLE_CHUNK, -1) for table in
                        self.model.layers[0].attention.rotary.tables(steps, dtype))
            self._tables = (step, cos, sin)
        first, cos, sin = self._tables
        return cos[step - first], sin[step - first]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Read ``tokens`` (``[B]`` ids, one per stream); return the next logits ``[B, V]``."""
        model = self.model
        hidden = F.embedding(tokens, model.embedding.weight)
        cos, sin = self._rotation(self.next_step, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, self.next_step, cos, sin)
        self.next_step += 1
        return torch.mm(model.norm_out(hidden), self.head)

    def memory(self) -> Memory:
        """The memory after everything read so far, as the general path would hold it (the
        entries it would have dropped marked invalid, no caches); a copy."""
        return self.frozen_memory()()

    def frozen_memory(self) -> Callable[[], Memory]:
        """A function giving :meth:`memory` as of now, whenever it is called (later steps do not
        change it): generation hands one out per token and builds the memory only if asked."""
        moments = [layer.frozen() for layer in self.layers]
        next_step, policy = self.next_step, self.model.config.memory

        def memory() -> Memory:
            return Memory([layer.memory(moment, next_step)
                           for layer, moment in zip(self.layers, moments, strict=True)],
                          next_step, policy)

        return memory
