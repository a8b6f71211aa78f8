"""Streaming generation with memory.

The prompt is read in blocks (one call), then tokens are produced one at a time, each read by the
one-token step of :mod:`expire_span.model.decoding` (or, for a policy without one, by a call of
length 1), which carries and prunes the memory, so memory stays bounded by what the policy keeps
and the cost per token does not grow with the number of tokens generated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from expire_span.memory import Memory
from expire_span.model.decoding import Decoder
from expire_span.model.transformer import MemoryTransformer


@dataclass
class GeneratedToken:
    """One generation step: ``tokens`` ``[B]`` sampled from ``logits`` ``[B, V]``; ``memory``
    is the memory after reading everything before these tokens (built when first read)."""

    tokens: Tensor
    logits: Tensor
    read_memory: Callable[[], Memory] = field(repr=False)

    @cached_property
    def memory(self) -> Memory:
        return self.read_memory()


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the smallest set whose
    probability reaches ``top_p`` (nucleus); the most likely token always survives."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check(prompt: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
           top_p: float | None) -> Tensor:
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token ([T] or [B, T] with T >= 1)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return prompt


@torch.no_grad()
def generate_stream(
    model: MemoryTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    memory: Memory | None = None,
    banned: list[int] | None = None,
) -> Iterator[GeneratedToken]:
    """Yield ``max_new_tokens`` sampled tokens one by one (see :func:`generate`); ``banned``
    token ids are never produced (e.g. a vocabulary's unknown symbol)."""
    prompt = _check(prompt, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    try:
        out = model(prompt, memory)
        logits, read_memory = out.logits[:, -1], _constant(out.memory)
        decoder = Decoder.build(model, out.memory) if max_new_tokens > 1 else None
        for index in range(max_new_tokens):
            logits = logits.float()
            if banned:
                logits[:, banned] = float("-inf")
            if temperature == 0:
                tokens = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            yield GeneratedToken(tokens, logits, read_memory)
            if index + 1 == max_new_tokens:
                break
            if decoder is not None:  # the one-token step (model/decoding.py)
                logits = decoder.step(tokens)
                read_memory = decoder.frozen_memory()
            else:
                out = model(tokens.unsqueeze(-1), out.memory)
                logits, read_memory = out.logits[:, -1], _constant(out.memory)
    finally:
        model.train(was_training)


def _constant(memory: Memory) -> Callable[[], Memory]:
    return lambda: memory


def generate(
    model: MemoryTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    memory: Memory | None = None,
) -> Tensor:
    """Sample a continuation of ``prompt`` (``[T]`` or ``[B, T]`` token ids).

    ``temperature`` 0 is greedy; ``top_k`` and ``top_p`` restrict sampling to the most likely
    tokens; ``seed`` makes sampling reproducible. ``memory`` (optional) is read before the prompt.
    Returns the new tokens, ``[B, max_new_tokens]``.
    """
    batch = prompt.shape[0] if prompt.dim() == 2 else 1
    steps = [
        step.tokens
        for step in generate_stream(model, prompt, max_new_tokens, temperature, top_k, top_p,
                                    seed, memory)
    ]
    if not steps:
        return torch.zeros(batch, 0, dtype=torch.long, device=model.device)
    return torch.stack(steps, dim=1)
