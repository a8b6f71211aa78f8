"""Compressive Transformer (Rae et al., 2020): old memories are compressed, not dropped.

Each layer keeps a FIFO of raw states and a compressed memory of ``n_cm`` slots; states leaving
the FIFO are compressed ``c`` to 1 by ``compress_fn`` (mean or max pooling, or a strided 1-D
convolution) and the queries attend ``[compressed memory; FIFO; block]``.

Streaming. What a query sees must depend on its step only, never on how the stream was cut into
calls, so the FIFO slides with the query (like our Transformer-XL window) and compression works
in groups aligned to the stream: group k holds the steps ``o + [k c, (k + 1) c)``, where ``o`` is
the stream's first step (0, or the step after a reset). For a query at step t let
``G(t) = max(0, floor((t - o - n_m) / c))`` be the number of groups whose every state has left
the FIFO (is more than ``n_m`` steps old). The query attends

- the raw states from step ``o + c G(t)`` to t: the last ``n_m`` states plus the up to ``c - 1``
  evicted states that wait for their group to be complete (they stay visible, so no state is
  ever out of sight between the FIFO and the compressed memory): ``n_m`` to ``n_m + c - 1``;
- the compressed slots of groups ``G(t) - n_cm <= k < G(t)``.

A block compresses the groups that leave the FIFO before the next block's first query
(``G(s) <= k < G(s')``), so it may create slots that its own later queries attend. Each
compressed slot takes the absolute step of the group's last state for its rotary position (an
integer, and the earliest step at which the whole group exists). Everything is a function of the
stream, so block calls, token-by-token calls and one long call agree exactly (eval mode), and a
reset stream behaves as a fresh one.

Training. The compression reads detached states (memories are detached everywhere) and the
slots the attention sees are detached from the compression function, so the task loss trains the
attention and everything else as usual but not the compression, as in the paper. The compression
is trained by the attention-reconstruction loss alone: for the block's queries h,
``compress_loss * sum ||attn(h, old) - attn(h, f(old))||^2 / (B T D)`` (a mean squared error per
query and feature), where ``old`` are the states compressed in this block and ``attn`` is the
layer's content attention with every parameter detached (``BlockContext.readout``): it trains f
and nothing else, and never stops the attention from learning through the task loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.memory import LayerMemory
from expire_span.policies.base import BlockContext, MaskDecision, MemoryPolicy
from expire_span.policies.flex_mask import FlexMask, MaskMod, key_ages


@dataclass
class CompressiveMemory(LayerMemory):
    """A layer's FIFO (``hidden``, ``steps``, ``valid``: raw states, packed left) plus its
    compressed memory and, per sample, the first step of its stream (``origin``, -1 until the
    next call sets it: a fresh or reset stream starts at the first step it reads)."""

    compressed: LayerMemory
    origin: Tensor

    def counts(self) -> Tensor:
        return super().counts() + self.compressed.counts()

    def reset(self, samples: Tensor) -> CompressiveMemory:
        forgotten = super().reset(samples)
        return dataclasses.replace(forgotten, origin=self.origin.masked_fill(samples, -1))


@dataclass
class CompressiveContext(LayerMemory):
    """What a block attends: ``[compressed memory; new compressed slots; FIFO; block]``.

    Attributes:
        num_compressed: the first ``num_compressed`` entries are compressed slots.
        origin: ``[B]`` first step of each stream.
        groups: ``[B, G, c, D]`` the raw states compressed in this block (detached).
        group_valid: ``[B, G]`` which of those groups exist (samples may compress fewer).
        compressed_new: ``[B, G, D]`` their compression, not detached (for the reconstruction
            loss; the context holds a detached copy).
    """

    num_compressed: int
    origin: Tensor
    groups: Tensor
    group_valid: Tensor
    compressed_new: Tensor


def _states(context: BlockContext) -> CompressiveContext:
    if not isinstance(context.states, CompressiveContext):
        raise TypeError("the compressive policy needs the context its context_states built")
    return context.states


class Compressor(nn.Module):
    """``f_c``: ``[B, G, c, D]`` groups of states -> ``[B, G, D]`` compressed slots."""

    def __init__(self, kind: str, d_model: int, rate: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv":
            # kernel c, stride c: one output per group. Starts as mean pooling.
            self.conv = nn.Conv1d(d_model, d_model, kernel_size=rate, stride=rate)
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(d_model).unsqueeze(-1).expand(-1, -1, rate))
                self.conv.weight.div_(rate)
                self.conv.bias.zero_()

    def forward(self, groups: Tensor) -> Tensor:
        if self.kind == "mean":
            return groups.mean(dim=2)
        if self.kind == "max":
            return groups.amax(dim=2)
        batch, count, rate, width = groups.shape
        flat = groups.reshape(batch * count, rate, width).transpose(1, 2)  # [B G, D, c]
        return self.conv(flat).reshape(batch, count, width)


@dataclass
class CompressiveMask(FlexMask):
    """:meth:`CompressivePolicy._visible` for FlexAttention: query ``q`` of the block sees raw
    state ``kv`` if its group is not yet evicted (``group >= G(t)``), and compressed slot ``kv``
    (the first ``num_compressed`` entries) if ``G(t) - n_cm <= group < G(t)``; never a future
    key or padding. Visibility only, no weights.

    Attributes:
        key_age: ``[B, N]`` int32 (:func:`~expire_span.policies.flex_mask.key_ages`).
        group: ``[B, N]`` int32, each entry's group in its stream.
        evicted: ``[B, T]`` int32, ``G(t)`` of each query (nondecreasing in ``t``).
        num_compressed: how many entries lead the context as compressed slots.
        cmem_len: ``n_cm``.
    """

    key_age: Tensor
    group: Tensor
    evicted: Tensor
    num_compressed: int
    cmem_len: int

    def mask_mod(self) -> MaskMod:
        key_age, group, evicted = self.key_age, self.group, self.evicted
        num_compressed, cmem_len = self.num_compressed, self.cmem_len

        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            slot_group, gone = group[b, kv], evicted[b, q]
            in_cmem = (slot_group < gone) & (slot_group >= gone - cmem_len)
            seen = torch.where(kv < num_compressed, in_cmem, slot_group >= gone)
            return seen & (key_age[b, kv] + q >= 0)

        return mod

    def query_ranges(self, num_queries: int) -> tuple[Tensor, Tensor, int]:
        group = self.group.long()
        evicted = self.evicted.long().contiguous()
        # G(t) is nondecreasing: the queries with G <= g are a prefix of the block.
        upto = torch.searchsorted(evicted, group, right=True)  # first q with G > g
        compressed = torch.arange(group.shape[1], device=group.device) < self.num_compressed
        upto_cmem = torch.searchsorted(evicted, group + self.cmem_len, right=True)
        lo = torch.where(compressed, upto, 0).maximum((-self.key_age.long()).clamp(0))
        hi = torch.where(compressed, upto_cmem, upto)
        lo = lo.clamp(max=num_queries)
        return lo.unsqueeze(1), hi.maximum(lo).unsqueeze(1), 0


class CompressivePolicy(MemoryPolicy):
    name = "compressive"
    skips_parameters = True  # a step in which no row compresses leaves the compressor unused

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.rate = config.compress_rate
        self.mem_len = config.mem_len or max(1, config.max_span // (self.rate + 1))
        self.cmem_len = config.cmem_len or max(1, (config.max_span - self.mem_len) // self.rate)
        self.compressor = Compressor(config.compress_fn, config.d_model, self.rate)

    def empty_memory(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> CompressiveMemory:
        raw = LayerMemory.empty(batch_size, self.config.d_model, device, dtype)
        return CompressiveMemory(
            raw.hidden, raw.steps, raw.valid,
            compressed=LayerMemory.empty(batch_size, self.config.d_model, device, dtype),
            origin=torch.full((batch_size,), -1, dtype=torch.long, device=device),
        )

    def evicted_groups(self, steps: Tensor, origin: Tensor) -> Tensor:
        """``G(t)``: groups wholly out of the FIFO for queries at ``steps`` (``[B, ...]``)."""
        shape = (-1,) + (1,) * (steps.dim() - 1)
        age = steps - origin.view(shape) - self.mem_len
        return torch.div(age, self.rate, rounding_mode="floor").clamp_min(0)

    def group_index(self, steps: Tensor, origin: Tensor) -> Tensor:
        """Group of the states at ``steps`` (``[B, N]``) in their stream."""
        return torch.div(steps - origin.unsqueeze(1), self.rate, rounding_mode="floor")

    def context_states(
        self, memory: CompressiveMemory, hidden: Tensor, steps: Tensor
    ) -> CompressiveContext:
        origin = torch.where(memory.origin < 0, steps[0], memory.origin)
        raw = LayerMemory(memory.hidden, memory.steps, memory.valid).append(hidden, steps)
        # The groups that leave the FIFO before the next block's first query, [G(s), G(s')).
        first = self.evicted_groups(torch.full_like(origin, int(steps[0])), origin)
        last = self.evicted_groups(torch.full_like(origin, int(steps[-1]) + 1), origin)
        new = last - first  # [B]
        width = int(new.max())
        offsets = torch.arange(width * self.rate, device=steps.device)
        wanted = origin.unsqueeze(1) + first.unsqueeze(1) * self.rate + offsets  # [B, G c]
        found = (raw.steps.unsqueeze(1) == wanted.unsqueeze(2)) & raw.valid.unsqueeze(1)
        index = found.to(torch.uint8).argmax(dim=2)  # where each wanted step sits in the FIFO
        d_model = raw.hidden.shape[-1]
        groups = raw.hidden.detach().gather(1, index.unsqueeze(-1).expand(-1, -1, d_model))
        groups = groups.view(len(origin), width, self.rate, d_model)
        group_valid = torch.arange(width, device=steps.device).unsqueeze(0) < new.unsqueeze(1)
        compressed_new = self.compressor(groups)
        group_steps = wanted.view(len(origin), width, self.rate)[..., -1]
        old = memory.compressed
        return CompressiveContext(
            hidden=torch.cat([old.hidden, compressed_new.detach(), raw.hidden], dim=1),
            steps=torch.cat([old.steps, group_steps, raw.steps], dim=1),
            valid=torch.cat([old.valid, group_valid, raw.valid], dim=1),
            num_compressed=old.width + width,
            origin=origin,
            groups=groups,
            group_valid=group_valid,
            compressed_new=compressed_new,
        )

    def _visible(self, states: CompressiveContext, query_steps: Tensor) -> Tensor:
        """``[B, T, N]``: which entries the queries at ``query_steps`` (``[B, T]``) attend."""
        evicted = self.evicted_groups(query_steps, states.origin).unsqueeze(2)  # [B, T, 1]
        group = self.group_index(states.steps, states.origin).unsqueeze(1)  # [B, 1, N]
        compressed = torch.arange(states.width, device=group.device) < states.num_compressed
        in_fifo = group >= evicted  # raw states from step o + c G(t) on
        in_cmem = (group < evicted) & (group >= evicted - self.cmem_len)
        return torch.where(compressed, in_cmem, in_fifo)

    def decide(self, context: BlockContext) -> MaskDecision:
        states = _states(context)
        queries = states.steps[:, -context.num_queries :]
        next_step = torch.full_like(queries[:, :1], context.next_step)
        keep = self._visible(states, next_step).squeeze(1)
        aux = self.reconstruction_loss(context)
        if context.flex:  # visibility as per-entry groups, for FlexAttention
            flex = CompressiveMask(
                key_ages(states.steps, states.valid, context.next_step - context.num_queries),
                self.group_index(states.steps, states.origin).to(torch.int32),
                self.evicted_groups(queries, states.origin).to(torch.int32),
                states.num_compressed, self.cmem_len,
            )
            return MaskDecision(bias=None, aux_loss=aux, keep=keep, flex=flex)
        unseen = ~self._visible(states, queries)
        bias = context.inputs.new_zeros(unseen.shape).masked_fill(unseen, float("-inf"))
        return MaskDecision(bias=bias.unsqueeze(1), aux_loss=aux, keep=keep)

    def reconstruction_loss(self, context: BlockContext) -> Tensor:
        """``compress_loss * sum_{b,t} ||attn(h, old) - attn(h, f(old))||^2 / (B T D)`` over
        the samples that compressed something in this block (0 when none did)."""
        states = _states(context)
        rows = states.group_valid.any(dim=1)
        if self.config.compress_loss == 0 or not bool(rows.any()) or context.readout is None:
            return self.zero(context)
        queries = states.hidden[rows, -context.num_queries :].detach()
        groups, valid = states.groups[rows], states.group_valid[rows]
        target = context.readout(
            queries, groups.flatten(1, 2), valid.repeat_interleave(self.rate, dim=1)
        )
        approx = context.readout(queries, states.compressed_new[rows], valid)
        error = (approx - target).square().sum() / approx.shape[-1]
        return self.config.compress_loss * error / (context.num_queries * states.batch_size)

    def update(self, context: BlockContext, decision: MaskDecision) -> CompressiveMemory:
        states = _states(context)
        split = states.num_compressed
        parts = [
            LayerMemory(states.hidden[:, cut], states.steps[:, cut], states.valid[:, cut])
            .select(decision.keep[:, cut])
            for cut in (slice(None, split), slice(split, None))
        ]
        compressed, raw = parts
        return CompressiveMemory(
            raw.hidden, raw.steps, raw.valid, compressed=compressed, origin=states.origin
        )
