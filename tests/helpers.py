"""Small builders shared by the tests."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from expire_span import MemoryTransformer, ModelConfig


def tiny_config(memory: str = "expire-span", **overrides) -> ModelConfig:
    values = dict(
        vocab_size=13,
        d_model=32,
        n_layers=2,
        n_heads=4,
        block_len=8,
        max_span=24,
        memory=memory,
        ramp=4,
        init_percentage=0.3,
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(memory: str = "expire-span", seed: int = 0, varied_spans: bool = True, **overrides):
    """An eval-mode model; with ``varied_spans`` the policies' own parameters get random values
    (at initialisation every span is the same and a convolution compresses like mean pooling):
    Expire-Span's memories expire at different times, Adaptive-Span's heads get different spans,
    and the compression convolution weighs each state of a group differently."""
    torch.manual_seed(seed)
    model = MemoryTransformer(tiny_config(memory, **overrides))
    if varied_spans:
        for layer in model.layers:
            policy = layer.policy
            predictor = getattr(policy, "span_predictor", None)
            if predictor is not None:
                torch.nn.init.normal_(predictor.weight, std=1.0)
            if hasattr(policy, "span_fraction"):
                torch.nn.init.uniform_(policy.span_fraction, 0.0, 1.0)
            conv = getattr(getattr(policy, "compressor", None), "conv", None)
            if conv is not None:
                torch.nn.init.normal_(conv.weight, std=0.2)
    return model.eval()


def stream(model: MemoryTransformer, tokens: torch.Tensor, chunk_sizes, memory=None):
    """Feed ``tokens`` in consecutive calls of the given sizes; return logits and final memory."""
    logits, start = [], 0
    for size in chunk_sizes:
        out = model(tokens[:, start : start + size], memory)
        logits.append(out.logits)
        memory = out.memory
        start += size
    assert start == tokens.shape[1]
    return torch.cat(logits, dim=1), memory


def record_uniforms(model: MemoryTransformer) -> list[list[float]]:
    """Make every layer's policy record the noise draw ``u`` (``BlockContext.block_uniform``)
    it is given, one entry per block: ``seen[layer][block]``."""
    seen: list[list[float]] = [[] for _ in model.layers]
    for index, layer in enumerate(model.layers):
        decide = layer.policy.decide

        def recording(context, decide=decide, index=index):
            seen[index].append(context.block_uniform)
            return decide(context)

        layer.policy.decide = recording
    return seen


@contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """A script of ``benchmarks/`` imported as a module (they import each other by name)."""
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(folder)
