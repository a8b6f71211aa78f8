"""The contract between a Transformer layer and its memory policy.

For every block the layer builds a :class:`BlockContext` (its memory followed by the block, with
the age of every key as seen from every query and which keys are causally visible), asks the policy
for a :class:`MaskDecision` (an additive attention bias, an auxiliary loss and which entries to
keep), attends, and then asks the policy for the memory to carry to the next block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.memory import LayerMemory
from expire_span.policies.flex_mask import FlexMask

Readout = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``readout(queries, keys, key_valid) -> [B, T, D]``: what the layer's attention reads from
``keys`` (``[B, N, D]`` raw states, ``key_valid`` ``[B, N]`` bool, at least one per row) for
``queries`` (``[B, T, D]`` raw states). Content only (no positions, no mask but ``key_valid``),
heads concatenated before the output projection, and every parameter of the layer (normalisation,
projections) detached: gradients reach only the inputs, never the attention's weights."""


PROBE_WEIGHT = 1e-12
"""The weight of a probe entry: a key the policy hides in effect (its weight is below float32's
resolution next to any real read) but keeps in the attention so that the loss's derivative with
respect to its mask can be measured (Expire-Span's ``grace``)."""
PROBE_BIAS = math.log(PROBE_WEIGHT)
"""The bias of a probe entry. A genuine ``log m`` of a float32 mask is above ``log 2^-24``, so
a bias at or below this is not counted as attended (``memory_size``)."""


def ramp_mask(remaining: Tensor, ramp: float) -> Tensor:
    """``m = clamp(1 + r / R, 0, 1)``: 1 while ``r >= 0``, linear decay over R steps, then 0."""
    return (1.0 + remaining / ramp).clamp(0.0, 1.0)


def log_mask_bias(mask: Tensor) -> Tensor:
    """Attention bias scaling each key by ``m``: ``log m``, exactly ``-inf`` where ``m = 0`` (a
    clamped log, so that ``m = 0`` gives neither NaN values nor NaN gradients)."""
    bias = mask.clamp_min(torch.finfo(mask.dtype).tiny).log()
    return bias.masked_fill(mask == 0, float("-inf"))


def selected_columns(columns: Tensor) -> Tensor:
    """``[B, C]`` indices of each row's selected columns (``columns`` ``[B, N]`` bool), C the
    largest count: rows with fewer are completed with distinct unselected columns, so that every
    row gathers C different columns."""
    width = int(columns.sum(dim=1).max())
    index = torch.argsort(columns.to(torch.uint8), dim=1, descending=True, stable=True)
    return index[:, :width]


def scatter_columns(bias: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``bias`` (``[B, ..., T, N]``) with the key columns ``index`` (``[B, C]``, from
    :func:`selected_columns`) replaced by ``values`` (``[B, ..., T, C]``): a constant bias with
    its differentiable columns put in."""
    return bias.scatter(-1, _column_entries(index, bias, values), values)


def write_columns_(bias: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """:func:`scatter_columns` in place and without gradient: ``bias`` (a constant) then holds
    the values of its differentiable columns (``MaskDecision.bias_columns``)."""
    return bias.scatter_(-1, _column_entries(index, bias, values), values.detach())


def _column_entries(index: Tensor, bias: Tensor, values: Tensor) -> Tensor:
    shape = (index.shape[0],) + (1,) * (bias.dim() - 2) + (index.shape[1],)
    return index.view(shape).expand(values.shape)


@dataclass
class BlockContext:
    """What a layer attends to while processing one block.

    Attributes:
        states: the memory followed by the block's own states (raw layer inputs), ``N`` entries.
        inputs: ``[B, N, D]`` the normalised states that keys, values (and spans) are computed from.
        age: ``[B, T, N]`` int64, query step minus key step (negative for future keys).
        visible: ``[B, T, N]`` bool, key is a real entry and not in the query's future.
        next_step: absolute step of the first query of the next block.
        block_uniform: one ``U(0, 1)`` draw per block, shared by all layers, for policies that
            randomise per block during training (0.5 outside training).
        readout: the layer's attention as a fixed function, for auxiliary objectives that must
            not train the attention (see :data:`Readout`); ``None`` outside a layer.
        compaction_slack: dead slots a memory may keep before it is packed (see
            :meth:`LayerMemory.select`); the layer sets it from the block length.
        flex: the layer attends with FlexAttention (``attention="flex"``): the policy should
            describe its mask in ``MaskDecision.flex`` and may leave ``bias`` as ``None``.
    """

    states: LayerMemory
    inputs: Tensor
    age: Tensor
    visible: Tensor
    next_step: int
    block_uniform: float = 0.5
    readout: Readout | None = None
    compaction_slack: int = 0
    flex: bool = False

    @property
    def num_queries(self) -> int:
        return self.age.shape[1]


@dataclass
class MaskDecision:
    """A policy's answer for one block.

    Attributes:
        bias: ``[B, 1 or H, T, N]`` added to attention scores: 0 keeps a key at full weight,
            ``log(m)`` scales it by ``m``, ``-inf`` hides it; ``None`` means no change. Causality
            and padding are applied by the layer, not here.
        aux_loss: scalar, already multiplied by its coefficient; a mean per query of the block.
        keep: ``[B, N]`` bool, which entries of ``context.states`` stay in memory.
        bias_grad_index: ``[B, C]`` int64, optional (from :func:`selected_columns`): the keys
            outside which the bias has a zero derivative in every row (the policy's promise), so
            that on CPU the layer can use fused attention and compute the bias gradient on these
            columns only; ``None``: unknown.
        bias_columns: ``[B, 1 or H, T, C]``, optional (with ``bias_grad_index``): the bias on
            those columns, differentiable; ``bias`` is then a constant that already holds their
            values, so the gradient is kept on ``[B, ., T, C]`` and never scattered into a
            ``[B, ., T, N]`` tensor. ``None``: ``bias`` itself carries any gradient.
        flex: the mask as per-key quantities (:mod:`expire_span.policies.flex_mask`), for
            FlexAttention; when set (only asked for when ``BlockContext.flex``) the layer uses it
            and ignores ``bias``. ``None``: the layer attends with ``bias`` (SDPA).

    The layer owns ``bias`` once it is returned (it hides future keys and padding in place).
    """

    bias: Tensor | None
    aux_loss: Tensor
    keep: Tensor
    bias_grad_index: Tensor | None = None
    bias_columns: Tensor | None = None
    flex: FlexMask | None = None

    def hide(self, hidden: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The bias with the ``hidden`` entries (``[B, 1, T, N]`` bool: future keys, padding) at
        ``-inf`` (a zero bias where the policy gave none; a constant one is changed in place) and
        ``bias_columns`` hidden alike: what the attention takes."""
        bias, columns = self.bias, self.bias_columns
        if bias is None:
            bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        if bias.requires_grad:
            bias = bias.masked_fill(hidden, float("-inf"))
        else:
            bias.masked_fill_(hidden, float("-inf"))
        if columns is not None:
            assert self.bias_grad_index is not None
            index = self.bias_grad_index
            by_entry = index[:, None, None, :].expand(-1, 1, hidden.shape[2], -1)
            columns = columns.masked_fill(hidden.gather(3, by_entry), float("-inf"))
        return bias, columns


class DecodeRule:
    """A policy's mask for one-token inference steps (generation), from values kept beside each
    memory instead of a :class:`BlockContext`: what :mod:`expire_span.model.decoding` needs to
    attend with a few operations per token. A policy without one (``decode_rule`` ``None``) is
    decoded by the layers' general path.

    Attributes:
        window: attend only the last ``window`` memories (and the query), with no bias: the
            policy's whole mask (Transformer-XL); ``None``: every live memory, with :meth:`bias`.
        projection: ``[K, D]`` or ``None``: a linear map of a new memory's normalised input
            (computed in the same product as its key and value) from which :meth:`kept` gives
            the value the rule keeps beside it (Expire-Span: the span predictor's weights).
    """

    window: int | None = None
    projection: Tensor | None = None

    def kept(self, projected: Tensor) -> Tensor:
        """``[...]``: the value kept beside each memory, from ``projected`` (``[..., K]``, the
        inputs times :attr:`projection`)."""
        raise NotImplementedError

    def bias(self, kept: Tensor | None, age: Tensor) -> Tensor | None:
        """``[B, 1 or H, N]`` additive attention bias (``-inf`` hides) of memories of ``age``
        (``[B, N]`` int64, 0 for the query itself) holding ``kept`` (``[B, N]``, :meth:`kept`)."""
        return None

    def alive(self, kept: Tensor | None, next_age: Tensor) -> Tensor:
        """``[B, N]`` bool: the memories some query at ``next_age`` steps on can still see (the
        policy's ``keep``)."""
        raise NotImplementedError


class MemoryPolicy(nn.Module):
    """Base class of memory policies: one instance per layer.

    Subclasses set :attr:`name`, implement :meth:`decide`, and may override
    :meth:`context_states` (to attend more than the memory and the block, e.g. compressed
    slots), :meth:`update` (when the new memory is not a subset of the context),
    :meth:`empty_memory` (when it holds more than hidden states, as a ``LayerMemory`` subclass)
    and :meth:`after_optimizer_step` (to project parameters).
    """

    name: ClassVar[str]
    skips_parameters: ClassVar[bool] = False
    """Whether a step may leave some of the policy's parameters out of the graph (multi-process
    training must then look for them in every step)."""
    aux_loss_forgets: ClassVar[bool] = False
    """Whether the auxiliary loss pushes memories out (a span penalty). The sequence trainer holds
    such a loss back until the task is being learned (``train.aux_hold``); a loss that teaches
    the policy to keep information (Compressive's reconstruction) acts from the first step."""
    aux_weight: float = 1.0
    """The weight the trainer gives the auxiliary loss at this step (its gate sets it before each
    training forward; 1 where no trainer does): for what a policy does to counter its own loss
    (Expire-Span's ``grace`` probes act only as strongly as the span loss does)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index

    @property
    def lr_scale(self) -> float:
        """Factor on the learning rate of this policy's own parameters (trainers put them in a
        parameter group of their own when it is not 1)."""
        return 1.0

    def empty_memory(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> LayerMemory:
        return LayerMemory.empty(batch_size, self.config.d_model, device, dtype)

    def context_states(self, memory: LayerMemory, hidden: Tensor, steps: Tensor) -> LayerMemory:
        """The states a block attends to: by default its memory followed by the block."""
        return memory.append(hidden, steps)

    def decide(self, context: BlockContext) -> MaskDecision:
        raise NotImplementedError

    def update(self, context: BlockContext, decision: MaskDecision) -> LayerMemory:
        """The memory for the next block (the layer detaches it)."""
        return context.states.select(decision.keep, context.compaction_slack)

    def after_optimizer_step(self) -> None:
        """Called by trainers after every optimizer step."""

    def decode_rule(self) -> DecodeRule | None:
        """The policy's mask for one-token inference steps, for fast generation; ``None`` (the
        default): generation uses the general path. Asked for in eval mode without gradients,
        and only when the memory is a plain :class:`LayerMemory`."""
        return None

    def zero(self, context: BlockContext) -> Tensor:
        """A zero auxiliary loss on the right device and dtype."""
        return context.inputs.new_zeros(())
