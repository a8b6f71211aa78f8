"""An actor-critic agent whose policy and value heads sit on a :class:`MemoryTransformer`.

Each environment step is one input vector: the sum of the embeddings of the observation's tokens
(one table, each field with its own range of ids) and of the previous action (a "none" id at the
start of an episode), plus a linear embedding of the previous reward. The transformer reads these
vectors with :meth:`MemoryTransformer.encode`, so any memory policy works unchanged; the agent acts
step by step (calls of one step) and the caller resets the memory of an environment whose episode
ended (:meth:`Memory.reset`). The transformer's own output head (next-token logits) is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from expire_span.config import ModelConfig
from expire_span.memory import Memory
from expire_span.model.transformer import MemoryTransformer


@dataclass
class AgentOutput:
    """``logits`` ``[B, T, A]`` action scores, ``values`` ``[B, T]`` state values; ``memory``,
    ``aux_loss``, ``memory_size`` and ``row_memory_size`` (``[n_layers, B]``) as in
    :class:`~expire_span.model.EncoderOutput`."""

    logits: Tensor
    values: Tensor
    memory: Memory
    aux_loss: Tensor
    memory_size: Tensor
    row_memory_size: Tensor


def agent_vocab_size(observation_sizes: Sequence[int], num_actions: int) -> int:
    """Token ids an agent needs: every observation field's values, the actions and "none"."""
    return sum(observation_sizes) + num_actions + 1


class MemoryAgent(nn.Module):
    """Policy and value heads on a memory Transformer.

    Args:
        config: the transformer's configuration; ``vocab_size`` must be
            :func:`agent_vocab_size` of the two other arguments.
        observation_sizes: number of values of each observation field (``MultiDiscrete.nvec``).
        num_actions: size of the ``Discrete`` action space.
    """

    offsets: Tensor
    sizes: Tensor

    def __init__(self, config: ModelConfig, observation_sizes: Sequence[int],
                 num_actions: int) -> None:
        super().__init__()
        sizes = [int(n) for n in observation_sizes]
        if not sizes or min(sizes) < 1 or num_actions < 1:
            raise ValueError(f"need observation fields of size >= 1 and >= 1 action, got "
                             f"{sizes} and {num_actions}")
        expected = agent_vocab_size(sizes, num_actions)
        if config.vocab_size != expected:
            raise ValueError(f"vocab_size must be {expected} for observation fields {sizes} and "
                             f"{num_actions} actions, got {config.vocab_size}")
        self.num_actions = num_actions
        self.observation_sizes = sizes
        self.transformer = MemoryTransformer(config)
        # field f's value v is token offsets[f] + v; the previous action comes after all fields
        starts = torch.tensor([0, *sizes]).cumsum(0)
        self.register_buffer("offsets", starts, persistent=False)
        self.register_buffer("sizes", torch.tensor([*sizes, num_actions + 1]), persistent=False)
        self.reward = nn.Linear(1, config.d_model)
        self.policy = nn.Linear(config.d_model, num_actions)
        self.value = nn.Linear(config.d_model, 1)
        for head in (self.reward, self.policy, self.value):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def init_memory(self, batch_size: int) -> Memory:
        return self.transformer.init_memory(batch_size)

    def after_optimizer_step(self) -> None:
        self.transformer.after_optimizer_step()

    def embed(self, observations: Tensor, prev_actions: Tensor, prev_rewards: Tensor) -> Tensor:
        """``[B, T, D]`` input vectors from observations ``[B, T, F]``, previous actions ``[B, T]``
        (``num_actions`` for none) and previous rewards ``[B, T]``."""
        fields = torch.cat([observations, prev_actions.unsqueeze(-1)], dim=-1).to(self.device)
        if fields.shape[-1] != len(self.sizes) or fields.shape[:2] != prev_rewards.shape:
            raise ValueError(f"expected observations [B, T, {len(self.observation_sizes)}], "
                             f"actions and rewards [B, T]; got {list(observations.shape)}, "
                             f"{list(prev_actions.shape)}, {list(prev_rewards.shape)}")
        if bool(((fields < 0) | (fields >= self.sizes)).any()):
            raise ValueError(f"observation or action tokens out of range: field sizes are "
                             f"{self.sizes.tolist()}")
        tokens = self.transformer.embedding(fields + self.offsets)
        rewards = prev_rewards.to(device=self.device, dtype=tokens.dtype).unsqueeze(-1)
        return tokens.sum(dim=-2) + self.reward(rewards)

    def forward(self, observations: Tensor, prev_actions: Tensor, prev_rewards: Tensor,
                memory: Memory | None = None) -> AgentOutput:
        """Read ``T`` steps of every environment after ``memory`` (``None``: empty)."""
        encoded = self.transformer.encode(
            self.embed(observations, prev_actions, prev_rewards), memory
        )
        return AgentOutput(
            logits=self.policy(encoded.hidden),
            values=self.value(encoded.hidden).squeeze(-1),
            memory=encoded.memory,
            aux_loss=encoded.aux_loss,
            memory_size=encoded.memory_size,
            row_memory_size=encoded.row_memory_size,
        )
