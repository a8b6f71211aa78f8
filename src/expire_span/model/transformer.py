"""A decoder-only Transformer that reads a stream in blocks and carries a memory between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.memory import LayerMemory, Memory
from expire_span.model.attention import MultiHeadAttention, Rotation
from expire_span.model.flex_attention import FlexPlan
from expire_span.policies import PROBE_BIAS, BlockContext, build_policy


@dataclass
class ModelOutput:
    """Result of :meth:`MemoryTransformer.forward`.

    Attributes:
        logits: ``[B, T, V]`` next-token scores.
        memory: the memory to pass to the next call (detached).
        aux_loss: scalar auxiliary loss of the memory policies (mean per query, summed over layers).
        memory_size: ``[n_layers]`` average number of earlier steps each query attended to
            (with non-zero weight), per layer: the paper's "average memory size".
    """

    logits: Tensor
    memory: Memory
    aux_loss: Tensor
    memory_size: Tensor


@dataclass
class EncoderOutput:
    """Result of :meth:`MemoryTransformer.encode`: like :class:`ModelOutput`, with the final
    hidden states (after the output norm, ``[B, T, D]``) in place of the logits, and
    ``row_memory_size`` ``[n_layers, B]``: ``memory_size`` of each sample (its mean over the
    batch is ``memory_size``), so that a caller can read the memory of particular samples at
    particular steps (an agent's decision steps)."""

    hidden: Tensor
    memory: Memory
    aux_loss: Tensor
    memory_size: Tensor
    row_memory_size: Tensor


@dataclass
class LayerOutput:
    hidden: Tensor
    memory: LayerMemory
    aux_loss: Tensor
    memory_size: Tensor
    row_memory_size: Tensor
    """``[B]``: ``memory_size`` of each sample."""


def _layer_means(per_block: list[tuple[float, list[LayerOutput]]]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The auxiliary loss (summed over layers), ``memory_size`` ``[n_layers]`` and
    ``row_memory_size`` ``[n_layers, B]`` of a call: each block's, weighted by its share of the
    call's steps; a few stacked operations per block rather than several per layer."""
    totals: list[Tensor] = []
    for weight, results in per_block:
        aux = torch.stack([r.aux_loss for r in results]).sum()
        aux = aux.to(torch.promote_types(aux.dtype, torch.float32))
        sizes = torch.stack([r.memory_size for r in results])
        rows = torch.stack([r.row_memory_size for r in results])
        parts = [aux, sizes, rows] if weight == 1.0 else [aux * weight, sizes * weight,
                                                          rows * weight]
        totals = parts if not totals else [t + p for t, p in zip(totals, parts, strict=True)]
    aux_loss, memory_size, row_memory_size = totals
    return aux_loss, memory_size.float(), row_memory_size.float()


class FeedForward(nn.Sequential):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            nn.Linear(config.d_model, config.inner_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.inner_dim, config.d_model),
        )


class TransformerLayer(nn.Module):
    """Attention over [memory; block] (masked by the layer's policy), then a feed-forward."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.config = config
        self.attention = MultiHeadAttention(config)
        self.feed_forward = FeedForward(config)
        self.norm_attention = nn.LayerNorm(config.d_model)
        self.norm_feed_forward = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.policy = build_policy(config, index)

    def forward(
        self, hidden: Tensor, memory: LayerMemory, steps: Tensor, block_uniform: float,
        rotation: Rotation | None = None,
        next_step: int | None = None,
    ) -> LayerOutput:
        """Process one block: ``hidden`` ``[B, T, D]`` at absolute ``steps`` ``[T]`` (whose
        rotary table, and ``next_step = steps[-1] + 1``, the model computes once for all
        layers)."""
        if next_step is None:
            next_step = int(steps[-1]) + 1
        queries = hidden.shape[1]
        if rotation is None:
            rotation = self.attention.rotary.tables(steps, hidden.dtype)
        states = self.policy.context_states(memory, hidden, steps)
        states, inputs, key_values = self._inputs_key_values(states, queries, rotation)
        age = steps.view(1, -1, 1) - states.steps.unsqueeze(1)  # [B, T, N]
        visible = states.valid.unsqueeze(1) & (age >= 0)
        # Packing the memory moves all of it; attending a dead slot costs one query per slot.
        # Packing once the dead slots reach width / (8 T) bounds both costs to about 1/8.
        slack = states.width // (8 * queries)
        context = BlockContext(
            states, inputs, age, visible, next_step, block_uniform, self.readout, slack,
            flex=self.config.attention == "flex",
        )
        decision = self.policy.decide(context)

        if decision.flex is not None:  # FlexAttention: the mask as per-key quantities, no bias
            plan = FlexPlan.build(decision.flex, queries, states.width)
            attended = self.attention(inputs[:, -queries:], steps, key_values, None,
                                      query_rotation=rotation, flex=plan)
            memory_size, row_memory_size = plan.memory_size, plan.row_memory_size
        else:
            bias, columns = decision.hide(~visible.unsqueeze(1), inputs.dtype)
            attended = self.attention(inputs[:, -queries:], steps, key_values, bias,
                                      decision.bias_grad_index, columns, rotation)
            with torch.no_grad():  # earlier steps seen with real weight (the query excluded)
                per_row = bias.numel() // (bias.shape[0] * bias.shape[-1])  # heads x queries
                seen = (bias > PROBE_BIAS).sum(dim=(1, 2, 3))
                row_memory_size = seen / per_row - 1.0
                memory_size = row_memory_size.mean()

        if self.config.pre_norm:
            hidden = hidden + self.dropout(attended)
            hidden = hidden + self.dropout(self.feed_forward(self.norm_feed_forward(hidden)))
        else:
            hidden = self.norm_attention(hidden + self.dropout(attended))
            hidden = self.norm_feed_forward(hidden + self.dropout(self.feed_forward(hidden)))
        new_memory = self.policy.update(context, decision).detach()
        return LayerOutput(hidden, new_memory, decision.aux_loss, memory_size, row_memory_size)

    def _kv_version(self) -> tuple[int, ...]:
        """Identifies the parameters keys and values depend on: a cache made with other values
        (after an optimizer step, a load, a move) is never used."""
        tensors = (self.attention.key_value.weight, self.norm_attention.weight,
                   self.norm_attention.bias)
        return tuple(x for t in tensors for x in (t.data_ptr(), t._version))

    def _caching(self) -> bool:
        """Keys and values are cached in the memory for inference only (eval, no gradients)."""
        return not self.training and not torch.is_grad_enabled()

    def _normalise(self, states: Tensor) -> Tensor:
        return self.norm_attention(states) if self.config.pre_norm else states

    def _inputs_key_values(self, states: LayerMemory, queries: int, rotation: Rotation
                           ) -> tuple[LayerMemory, Tensor, Tensor]:
        """The states (with their caches, in inference), their normalised inputs and their keys
        and values. In inference the memory's cached ones are reused when valid, so only the
        block's own states are normalised and projected."""
        if not self._caching():
            inputs = self._normalise(states.hidden)
            return states, inputs, self.attention.keys_values(inputs, states.steps)
        version = self._kv_version()
        if states.cached_width(version) == states.width - queries:
            inputs = self._normalise(states.hidden[:, -queries:])
            key_values = self.attention.keys_values(inputs, states.steps[:, -queries:], rotation)
        else:
            inputs = self._normalise(states.hidden)
            key_values = self.attention.keys_values(inputs, states.steps)
        states = states.with_caches(inputs, key_values, version)
        assert states.inputs is not None and states.kv is not None
        return states, states.inputs, states.kv

    def readout(self, queries: Tensor, keys: Tensor, key_valid: Tensor) -> Tensor:
        """This layer's normalisation and content attention with every parameter detached
        (:data:`expire_span.policies.base.Readout`), for policies' auxiliary losses."""
        if self.config.pre_norm:
            norm = self.norm_attention
            weight, bias = norm.weight.detach(), norm.bias.detach()
            queries, keys = (
                F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
                for x in (queries, keys)
            )
        return self.attention.readout(queries, keys, key_valid)


class MemoryTransformer(nn.Module):
    """Decoder-only Transformer with a per-layer memory chosen by ``config.memory``.

    Calls may have any length T >= 1: the tokens are processed in blocks of ``block_len`` (the
    last one possibly shorter), the memory being updated, pruned and detached after each block.
    Block calls, token-by-token calls and one long call give the same outputs in eval mode.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.n_layers))
        self.norm_out = nn.LayerNorm(config.d_model) if config.pre_norm else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        """GPT-style: N(0, 0.02), residual projections scaled by 1 / sqrt(2 n_layers)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for layer in self.layers:
            for module in (layer.attention, layer.feed_forward):
                for sub in module.modules():
                    if isinstance(sub, nn.Linear):
                        nn.init.normal_(sub.weight, std=0.02)
                        if sub.bias is not None:
                            nn.init.zeros_(sub.bias)
            nn.init.normal_(layer.attention.out.weight, std=residual_std)
            nn.init.normal_(layer.feed_forward[-1].weight, std=residual_std)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def init_memory(self, batch_size: int) -> Memory:
        """An empty memory for a batch of ``batch_size`` streams, starting at step 0."""
        dtype = self.embedding.weight.dtype
        layers = [
            layer.policy.empty_memory(batch_size, self.device, dtype) for layer in self.layers
        ]
        return Memory(layers, next_step=0, policy=self.config.memory)

    def forward(self, tokens: Tensor, memory: Memory | None = None) -> ModelOutput:
        """Read ``tokens`` (``[B, T]`` integer ids) after ``memory`` (``None``: empty memory)."""
        encoded = self.encode(self.embedding(self._check_tokens(tokens)), memory)
        return ModelOutput(
            logits=self.head(encoded.hidden),
            memory=encoded.memory,
            aux_loss=encoded.aux_loss,
            memory_size=encoded.memory_size,
        )

    def encode(self, inputs: Tensor, memory: Memory | None = None) -> EncoderOutput:
        """Run the layers on given input vectors (``[B, T, D]``, e.g. embeddings a caller computed
        itself) after ``memory``; :meth:`forward` is this on the token embeddings, plus the head."""
        inputs = self._check_inputs(inputs)
        batch, total = inputs.shape[:2]
        memory = self.init_memory(batch) if memory is None else self._check_memory(memory, batch)
        layers, next_step = list(memory.layers), memory.next_step
        outputs, per_block = [], []
        for block in inputs.split(self.config.block_len, dim=1):
            length = block.shape[1]
            steps = torch.arange(next_step, next_step + length, device=inputs.device)
            block_uniform = float(torch.rand(())) if self.training else 0.5
            rotation = self.layers[0].attention.rotary.tables(steps, block.dtype)
            hidden = self.dropout(block)
            results = []
            for index, layer in enumerate(self.layers):
                result = layer(hidden, layers[index], steps, block_uniform, rotation,
                               next_step + length)
                hidden, layers[index] = result.hidden, result.memory
                results.append(result)
            per_block.append((length / total, results))
            outputs.append(self.norm_out(hidden))
            next_step += length
        aux_loss, memory_size, row_memory_size = _layer_means(per_block)
        return EncoderOutput(
            hidden=torch.cat(outputs, dim=1),
            memory=Memory(layers, next_step, self.config.memory),
            aux_loss=aux_loss,
            memory_size=memory_size,
            row_memory_size=row_memory_size,
        )

    def after_optimizer_step(self) -> None:
        """Let policies project their parameters back into range (trainers call this)."""
        for layer in self.layers:
            layer.policy.after_optimizer_step()

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(
                f"tokens must have shape [B, T] with B, T >= 1, got {list(tokens.shape)}"
            )
        low, high = (int(bound) for bound in torch.aminmax(tokens))
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]"
            )
        return tokens.to(device=self.device, dtype=torch.long)

    def _check_inputs(self, inputs: Tensor) -> Tensor:
        if not isinstance(inputs, Tensor) or not inputs.dtype.is_floating_point:
            raise TypeError("inputs must be a floating-point torch.Tensor of shape [B, T, D]")
        if inputs.dim() != 3 or inputs.shape[0] < 1 or inputs.shape[1] < 1:
            raise ValueError(f"inputs must have shape [B, T, D] with B, T >= 1, got "
                             f"{list(inputs.shape)}")
        if inputs.shape[2] != self.config.d_model:
            raise ValueError(f"inputs have width {inputs.shape[2]}, this model has d_model "
                             f"{self.config.d_model}")
        return inputs.to(self.device)

    def _check_memory(self, memory: Memory, batch: int) -> Memory:
        if not isinstance(memory, Memory):
            raise TypeError(f"memory must be an expire_span.Memory or None, got {type(memory)}")
        if memory.policy != self.config.memory:
            raise ValueError(
                f"memory was made by policy {memory.policy!r}, this model uses "
                f"{self.config.memory!r}"
            )
        if len(memory.layers) != len(self.layers):
            raise ValueError(
                f"memory has {len(memory.layers)} layers, this model has {len(self.layers)}"
            )
        if memory.batch_size != batch:
            raise ValueError(
                f"memory is for a batch of {memory.batch_size}, tokens have batch size {batch}"
            )
        width = memory.layers[0].hidden.shape[-1]
        if width != self.config.d_model:
            raise ValueError(f"memory states have width {width}, this model has d_model "
                             f"{self.config.d_model}: the memory comes from another model")
        if memory.layers[0].hidden.device != self.device:
            raise ValueError(
                f"memory is on {memory.layers[0].hidden.device}, the model on {self.device}"
            )
        return memory
