"""The memory a layer carries from one block to the next.

A memory is a set of detached past hidden states, each tagged with the absolute step of the token
that produced it. Positions are always derived from these steps, never from an index in the cache,
so memories can be removed from anywhere without shifting the others.

Samples of a batch may keep different numbers of memories. The cache stays rectangular by padding:
each sample's kept memories are packed to the left (in step order) and the row is padded up to the
longest row of the batch; ``valid`` marks the real entries. Padding costs compute (attention over
``max`` instead of ``mean`` kept memories) but never keeps an expired memory alive.

In inference (no gradients) the wide per-slot tensors (hidden states and the layer's caches) live
in preallocated :class:`SlotBuffers` that a memory grows into: reading one token then writes one
slot instead of copying the whole memory into a fresh tensor (on a virtual machine whose fresh
pages fault one by one, that copy cost more than the token's attention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class LayerMemory:
    """One layer's memory.

    Attributes:
        hidden: ``[B, N, D]`` detached hidden states (the layer's input at those steps).
        steps: ``[B, N]`` int64 absolute step of each state.
        valid: ``[B, N]`` bool, False for padding.

    Policies that keep more than this (e.g. a compressed memory) subclass it and add fields;
    tensor fields and nested ``LayerMemory`` fields are saved, moved, reset, sliced and
    concatenated generically. Tensor fields are indexed by sample first; those of two or more
    dimensions by slot second (like ``hidden``), one-dimensional ones hold one value per sample.
    """

    hidden: Tensor
    steps: Tensor
    valid: Tensor
    kv: Tensor | None = field(default=None, kw_only=True, repr=False, metadata={"cache": True})
    """Inference cache: ``[B, N, 2 D]`` keys (rotated at their steps) and values of the states, or
    None. The layer sets and reads it only in eval mode without gradients, and only for the
    parameters ``kv_version`` names; it is never saved."""
    inputs: Tensor | None = field(default=None, kw_only=True, repr=False, metadata={"cache": True})
    """Inference cache beside ``kv``: ``[B, N, D]`` the normalised states it was computed from."""
    kv_version: tuple[int, ...] = field(default=(), kw_only=True, repr=False,
                                        metadata={"cache": True})
    buffers: SlotBuffers | None = field(default=None, kw_only=True, repr=False, compare=False,
                                        metadata={"cache": True})
    """Inference only: the storage ``hidden`` (and the caches, when set) are a prefix of."""

    @classmethod
    def empty(
        cls, batch_size: int, d_model: int, device: torch.device | str, dtype: torch.dtype
    ) -> LayerMemory:
        return cls(
            hidden=torch.zeros(batch_size, 0, d_model, device=device, dtype=dtype),
            steps=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def width(self) -> int:
        """Slots per sample, padding included."""
        return self.hidden.shape[1]

    def counts(self) -> Tensor:
        """``[B]`` number of real memories each sample holds."""
        return self.valid.sum(dim=1)

    def append(self, hidden: Tensor, steps: Tensor) -> LayerMemory:
        """This memory followed by new states (all valid); ``steps`` is ``[T]`` or ``[B, T]``.
        Without gradients, the states are written into this memory's buffers when it owns their
        free tail; the caches are left for the layer to extend (:meth:`with_caches`)."""
        batch, length = hidden.shape[:2]
        steps = steps.expand(batch, length) if steps.dim() == 1 else steps
        valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        steps = torch.cat([self.steps, steps], dim=1)
        valid = torch.cat([self.valid, valid], dim=1)
        if torch.is_grad_enabled():
            return LayerMemory(torch.cat([self.hidden, hidden], dim=1), steps, valid,
                               kv=self.kv, inputs=self.inputs, kv_version=self.kv_version)
        buffers = self.buffers
        if buffers is None or not buffers.owns_tail(self.width, length):
            buffers = SlotBuffers.holding(self._wide(), self.width + length)
        buffers.write(self.width, hidden=hidden)
        return LayerMemory(buffers.prefix("hidden", self.width + length), steps, valid,
                           **buffers.prefixes(self._cache_widths()), kv_version=self.kv_version,
                           buffers=buffers)

    def with_caches(self, inputs: Tensor, kv: Tensor, version: tuple[int, ...]) -> LayerMemory:
        """This memory with its caches for ``version``: ``inputs`` and ``kv`` of every slot, or of
        the last slots only when the caches already describe all the others (written in place
        when this memory's buffers hold those slots)."""
        fresh = inputs.shape[1]
        if self.cached_width(version) != self.width - fresh:
            return dataclasses.replace(self, inputs=inputs, kv=kv, kv_version=version,
                                       buffers=None)
        buffers = self.buffers
        if buffers is not None and buffers.filled == self.width:  # the slots are this memory's
            buffers.write(self.width - fresh, inputs=inputs, kv=kv)
            views = buffers.prefixes({"inputs": self.width, "kv": self.width})
            return dataclasses.replace(self, **views, kv_version=version)
        inputs, kv = (new if old is None else torch.cat([old, new], dim=1)
                      for old, new in ((self.inputs, inputs), (self.kv, kv)))
        return dataclasses.replace(self, inputs=inputs, kv=kv, kv_version=version, buffers=None)

    def cached_width(self, version: tuple[int, ...]) -> int:
        """How many leading slots the caches describe for the parameters ``version`` names."""
        return self.kv.shape[1] if self.kv is not None and self.kv_version == version else 0

    def _cache_widths(self) -> dict[str, int]:
        """The caches that describe every slot of this memory (the ones worth keeping)."""
        if self.kv is None or self.kv.shape[1] != self.width:
            return {}
        return {"inputs": self.width, "kv": self.width}

    def _wide(self) -> dict[str, Tensor]:
        """The per-slot tensors that :class:`SlotBuffers` hold: the states and full caches."""
        caches = {name: getattr(self, name) for name in self._cache_widths()}
        return {"hidden": self.hidden, **caches}

    def select(self, keep: Tensor, slack: int = 0) -> LayerMemory:
        """Keep the entries where ``keep`` (``[B, N]`` bool) holds, packed left, in step order.

        The result is as wide as the sample that keeps the most; other rows are padded. When
        packing would free at most ``slack`` slots, the dropped entries are only marked invalid
        and nothing moves: a caller that drops a few entries per call (token-by-token inference)
        then pays for moving the memory once every ``slack`` drops instead of at every call.
        """
        keep = keep & self.valid
        counts = keep.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        if self.width - width <= slack:
            return dataclasses.replace(self, valid=keep)
        # A stable sort of "not kept" moves kept entries to the front without reordering them.
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]
        rows = torch.arange(self.batch_size, device=keep.device).unsqueeze(1)
        slots = torch.arange(width, device=keep.device)
        # whole rows of D values: faster than gather
        packed = {name: value[rows, order] for name, value in self._wide().items()}
        buffers = None
        if not torch.is_grad_enabled() and (self.buffers is not None or "kv" in packed):
            buffers = SlotBuffers.holding(packed, width)
            packed = buffers.prefixes({name: width for name in packed})
        return LayerMemory(
            hidden=packed["hidden"],
            steps=self.steps.gather(1, order),
            valid=slots.unsqueeze(0) < counts.unsqueeze(1),
            kv=packed.get("kv"),
            inputs=packed.get("inputs"),
            kv_version=self.kv_version if "kv" in packed else (),
            buffers=buffers,
        )

    def reset(self, samples: Tensor) -> LayerMemory:
        """Forget everything for the samples where ``samples`` (``[B]`` bool) holds."""
        changes: dict[str, object] = {"valid": self.valid & ~samples.unsqueeze(1)}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, LayerMemory):
                changes[item.name] = value.reset(samples)
        return dataclasses.replace(self, **changes)

    def detach(self) -> LayerMemory:
        """The same memory cut from the autograd graph (caches included)."""
        if not torch.is_grad_enabled() and not self.hidden.requires_grad:
            return self  # made without gradients: nothing to cut
        changes: dict[str, object] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, (LayerMemory, Tensor)):
                changes[item.name] = value.detach()
        return dataclasses.replace(self, **changes)

    def rows(self, index: slice) -> LayerMemory:
        """The memory of the samples ``index`` selects, without the trailing slots none of them
        uses (caches are dropped): one process's or one micro-batch's share of a batch."""
        used = self.valid[index].any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 0
        changes = _no_caches(self)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, LayerMemory):
                changes[item.name] = value.rows(index)
            elif isinstance(value, Tensor) and not item.metadata.get("cache"):
                changes[item.name] = value[index, :width] if value.dim() > 1 else value[index]
        return dataclasses.replace(self, **changes)

    @staticmethod
    def concat(parts: list[LayerMemory]) -> LayerMemory:
        """The samples of memories of one kind stacked into one batch, in order; narrower ones
        are padded with invalid slots (caches are dropped)."""
        first = parts[0]
        width = max(part.width for part in parts)
        changes = _no_caches(first)
        for item in dataclasses.fields(first):
            values = [getattr(part, item.name) for part in parts]
            if isinstance(values[0], LayerMemory):
                changes[item.name] = LayerMemory.concat(values)
            elif isinstance(values[0], Tensor) and not item.metadata.get("cache"):
                changes[item.name] = torch.cat([_pad_slots(value, width) for value in values])
        return dataclasses.replace(first, **changes)

    def to(self, device: torch.device | str) -> LayerMemory:
        """The same memory on ``device`` (caches are dropped)."""
        changes = _no_caches(self)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, LayerMemory):
                changes[item.name] = value.to(device)
            elif isinstance(value, Tensor) and not item.metadata.get("cache"):
                changes[item.name] = value.to(device)
        return dataclasses.replace(self, **changes)

    def tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat ``name -> tensor`` view of the state (for saving; caches are left out)."""
        out: dict[str, Tensor] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, LayerMemory):
                out.update(value.tensors(f"{prefix}{item.name}."))
            elif isinstance(value, Tensor) and not item.metadata.get("cache"):
                out[f"{prefix}{item.name}"] = value
        return out

    def with_tensors(self, tensors: dict[str, Tensor], prefix: str = "") -> LayerMemory:
        """A memory of the same structure as this one, filled from :meth:`tensors` output
        (without caches)."""
        changes = _no_caches(self)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            key = f"{prefix}{item.name}"
            if item.metadata.get("cache"):
                continue
            if isinstance(value, LayerMemory):
                changes[item.name] = value.with_tensors(tensors, f"{key}.")
            elif isinstance(value, Tensor):
                if key not in tensors:
                    raise KeyError(f"memory tensor {key!r} is missing")
                changes[item.name] = tensors[key].to(device=value.device, dtype=value.dtype)
        return dataclasses.replace(self, **changes)


def _no_caches(memory: LayerMemory) -> dict[str, Any]:
    """The changes that drop a memory's caches (and its buffers)."""
    return {item.name: item.default for item in dataclasses.fields(memory)
            if item.metadata.get("cache")}


class SlotBuffers:
    """Preallocated per-slot storage that inference memories grow into.

    Memories are values: a call never changes the memory it was given. A memory made from these
    buffers is a prefix of them; appending writes into the free slots after it only when that
    memory is the one that wrote the last slot (``filled``), so a memory extended twice (two
    continuations of one stream) gets its own copy the second time, and no memory ever sees
    another's slots change. Capacity grows by a quarter (at least 64 slots) when it runs out.
    """

    def __init__(self, tensors: dict[str, Tensor], filled: int) -> None:
        self.tensors = tensors
        self.filled = filled

    @classmethod
    def holding(cls, values: dict[str, Tensor], width: int) -> SlotBuffers:
        """New buffers with room for ``width`` slots and more, the first ones holding
        ``values`` (``name -> [B, n, ...]``, n <= width)."""
        capacity = width + max(64, width // 4)
        tensors = {}
        for name, value in values.items():
            tensors[name] = value.new_empty((value.shape[0], capacity, *value.shape[2:]))
            tensors[name][:, : value.shape[1]] = value
        return cls(tensors, min(value.shape[1] for value in values.values()))

    def owns_tail(self, width: int, length: int) -> bool:
        """Whether a memory of ``width`` slots may write ``length`` more in place."""
        capacity = next(iter(self.tensors.values())).shape[1]
        return self.filled == width and width + length <= capacity

    def write(self, start: int, **values: Tensor) -> None:
        """Write ``[B, n, ...]`` values at slots ``start ...`` (allocating a buffer for a new
        name); the buffers are then filled up to the end of what was written."""
        for name, value in values.items():
            if name not in self.tensors:
                capacity = next(iter(self.tensors.values())).shape[1]
                self.tensors[name] = value.new_empty((value.shape[0], capacity,
                                                      *value.shape[2:]))
            self.tensors[name][:, start : start + value.shape[1]] = value
        self.filled = start + next(iter(values.values())).shape[1]

    def prefix(self, name: str, width: int) -> Tensor:
        return self.tensors[name][:, :width]

    def prefixes(self, widths: dict[str, int]) -> dict[str, Tensor]:
        return {name: self.prefix(name, width) for name, width in widths.items()}


def _pad_slots(value: Tensor, width: int) -> Tensor:
    """A per-slot tensor widened to ``width`` slots with zeros (``False`` for ``valid``)."""
    if value.dim() < 2 or value.shape[1] == width:
        return value
    padding = value.new_zeros((value.shape[0], width - value.shape[1], *value.shape[2:]))
    return torch.cat([value, padding], dim=1)


@dataclass
class Memory:
    """The memory of a whole model: one :class:`LayerMemory` per layer.

    Attributes:
        layers: per-layer memories.
        next_step: absolute step of the next token of the stream (shared by the batch).
        policy: name of the policy that made it (a memory is not portable across policies).
    """

    layers: list[LayerMemory]
    next_step: int
    policy: str

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def sizes(self) -> Tensor:
        """``[n_layers, B]`` number of memories each layer holds for each sample."""
        return torch.stack([layer.counts() for layer in self.layers])

    def reset(self, samples: Tensor) -> Memory:
        """Forget everything for the given samples (``[B]`` bool), e.g. at episode boundaries."""
        samples = samples.to(device=self.layers[0].valid.device, dtype=torch.bool)
        if samples.shape != (self.batch_size,):
            raise ValueError(
                f"reset mask must have shape [{self.batch_size}], got {list(samples.shape)}"
            )
        return Memory([layer.reset(samples) for layer in self.layers], self.next_step, self.policy)

    def rows(self, index: slice) -> Memory:
        """The memory of the streams ``index`` selects (see :meth:`LayerMemory.rows`)."""
        return Memory([layer.rows(index) for layer in self.layers], self.next_step, self.policy)

    @staticmethod
    def concat(parts: list[Memory]) -> Memory:
        """The streams of several memories of one step and policy, stacked in order."""
        first = parts[0]
        if any(p.next_step != first.next_step or p.policy != first.policy for p in parts):
            raise ValueError("only memories of the same step and policy can be concatenated")
        layers = [LayerMemory.concat(list(group)) for group in zip(*(p.layers for p in parts),
                                                                   strict=True)]
        return Memory(layers, first.next_step, first.policy)

    def to(self, device: torch.device | str) -> Memory:
        return Memory([layer.to(device) for layer in self.layers], self.next_step, self.policy)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (safetensors-ready); ``next_step`` is stored as a 0-d tensor."""
        out = {"next_step": torch.tensor(self.next_step, dtype=torch.long)}
        for index, layer in enumerate(self.layers):
            out.update(layer.tensors(f"layers.{index}."))
        return out

    def load_state_dict(self, tensors: dict[str, Tensor]) -> Memory:
        """A memory shaped like this one (same policy structure) holding the saved tensors."""
        layers = [
            layer.with_tensors(tensors, f"layers.{index}.")
            for index, layer in enumerate(self.layers)
        ]
        return Memory(layers, int(tensors["next_step"]), self.policy)
