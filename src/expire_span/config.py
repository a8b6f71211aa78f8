"""Model hyperparameters, shared by the model and every memory policy.

This module imports nothing from the package, so that every room (policies, model, training, cli)
can read the configuration without creating an import cycle.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ATTENTION_BACKENDS = ("auto", "dense", "sdpa", "flex")
"""Names accepted by ``ModelConfig.attention``."""
COMPRESSION_FUNCTIONS = ("conv", "max", "mean")
SPAN_LOSSES = ("ramp", "l1")
"""Names accepted by ``ModelConfig.span_loss`` (Expire-Span's auxiliary loss)."""
"""Names accepted by ``ModelConfig.compress_fn`` (Compressive Transformer)."""


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`~expire_span.MemoryTransformer`.

    The first group describes the Transformer, the second the stream (``block_len`` = M,
    ``max_span`` = L), the last the memory policies' own hyperparameters. A policy reads only the
    fields it needs; the others are ignored (and recorded, so a run states what it used).
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_inner: int | None = None
    """Feed-forward width; ``None`` means ``4 * d_model``."""
    dropout: float = 0.0
    pre_norm: bool = True
    rope_base: float = 10000.0
    """Base of the rotary position embedding, applied at each state's absolute step."""
    tie_embeddings: bool = False
    attention: str = "auto"
    """Attention kernel: ``dense`` (explicit softmax, the reference), ``sdpa`` (PyTorch's fused
    scaled_dot_product_attention with the policy's bias as a float mask), ``auto`` (= sdpa),
    ``flex`` (PyTorch FlexAttention from the policy's per-key mask description, no bias tensor,
    tiles of expired and future keys skipped; for CUDA: on CPU forward only, no attention
    dropout; policies that give no description use sdpa; see model/flex_attention.py)."""

    block_len: int = 64
    """M: tokens per block; memory is updated (and pruned) after every block."""
    max_span: int = 1024
    """L: the longest a memory may live (Expire-Span), the window (Transformer-XL), the largest
    span (Adaptive-Span), or the reach of FIFO plus compressed memory (Compressive)."""
    memory: str = "expire-span"
    """Name of the memory policy (see :func:`expire_span.policies.available_policies`)."""

    ramp: int = 32
    """R: length of the soft ramp of the expiration mask (Expire-Span, Adaptive-Span)."""
    alpha: float = 1e-6
    """Coefficient of the Expire-Span auxiliary loss on the spans."""
    span_loss: str = "ramp"
    """Form of the Expire-Span auxiliary loss: ramp (the released code's: only (query, memory)
    pairs on the ramp are charged) or l1 (the paper's: alpha * sum of every new memory's span /
    T, so memories that never reach their ramp are charged too). One alpha means the same
    pressure in both: each memory is charged alpha per unit of span once in its life."""
    init_percentage: float = 0.1
    """p: every span starts at p * L (bias = logit(p), weights = 0)."""
    pre_div: float = 1.0
    """c: the span predictor sees h / c, keeping the sigmoid out of saturation for large L."""
    span_lr_scale: float = 1.0
    """Learning-rate factor of the span parameters (Expire-Span's predictor, Adaptive-Span's
    spans), in an optimizer group of their own: with Adam a span moves by about ``lr * L`` per
    step whatever its gradient's size. What slower and faster spans did is in
    docs/expire-span.md ("After the release") and docs/rl.md (the curriculum)."""
    grace: int = 0
    """G (Expire-Span, training only): steps past the end of the ramp during which an expired
    memory is still cached and the mask's derivative is taken as if its lower clamp were open,
    so a needed memory pushed just past its read gets a gradient back. The forward is unchanged
    up to a weight of 1e-12 on those memories; evaluation and inference neither see nor keep
    them. 0: off (the paper's and the release's mask; the default: what it buys and costs is
    measured in docs/expire-span.md, "A gradient past the ramp")."""
    noisy: bool = False
    """Random span shortening during training: spans clamped to u * L, u ~ U(0, 1) per block."""
    prune_expired: bool = True
    """Delete memories no future query can attend; False keeps them (masked) up to L + R steps
    (Expire-Span) or L steps (Adaptive-Span)."""

    adapt_span_init: float = 0.0
    """Adaptive-Span: every head's span starts at this fraction of L (in [0, 1])."""
    adapt_span_loss: float = 5e-7
    """Adaptive-Span: coefficient of the L1 loss on the spans (per layer: coefficient * mean z)."""

    compress_rate: int = 3
    """c: Compressive Transformer compression rate (c states -> 1 compressed slot)."""
    compress_fn: str = "conv"
    """Compression function: conv (strided 1-D convolution), max or mean (pooling)."""
    compress_loss: float = 1.0
    """Coefficient of the attention-reconstruction loss (trains the compression function only)."""
    mem_len: int | None = None
    """n_m: Compressive FIFO length; None means L // (c + 1)."""
    cmem_len: int | None = None
    """n_cm: Compressive compressed slots; None means (L - n_m) // c, so n_m + c * n_cm <= L."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def inner_dim(self) -> int:
        return self.d_inner if self.d_inner is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"ModelConfig.{item.name} must be a finite number, got {value!r}")
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "block_len", "max_span")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_inner is not None and self.d_inner < 1:
            raise ValueError(f"ModelConfig.d_inner must be positive or None, got {self.d_inner!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"the head dimension d_model / n_heads = {self.head_dim} must be even "
                "(rotary position embeddings rotate pairs of channels)"
            )
        if self.max_span < self.block_len:
            raise ValueError(
                f"max_span (L={self.max_span}) must be at least block_len (M={self.block_len})"
            )
        if not isinstance(self.ramp, int) or isinstance(self.ramp, bool) or self.ramp <= 0:
            raise ValueError(f"ramp (R) must be a positive integer, got {self.ramp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if not 0.0 < self.init_percentage < 1.0:
            raise ValueError(f"init_percentage must be in (0, 1), got {self.init_percentage!r}")
        if self.pre_div <= 0:
            raise ValueError(f"pre_div must be > 0, got {self.pre_div!r}")
        if not isinstance(self.grace, int) or isinstance(self.grace, bool) or self.grace < 0:
            raise ValueError(f"grace must be an integer >= 0, got {self.grace!r}")
        if self.grace and self.attention == "flex":
            raise ValueError("grace > 0 needs a bias tensor: use attention auto, sdpa or dense, "
                             "not flex")
        if self.span_lr_scale <= 0:
            raise ValueError(f"span_lr_scale must be > 0, got {self.span_lr_scale!r}")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}"
            )
        if not isinstance(self.memory, str) or not self.memory:
            raise ValueError(f"memory must be a policy name, got {self.memory!r}")
        self._validate_baselines()

    def _validate_baselines(self) -> None:
        if not 0.0 <= self.adapt_span_init <= 1.0:
            raise ValueError(f"adapt_span_init must be in [0, 1], got {self.adapt_span_init!r}")
        for name in ("adapt_span_loss", "compress_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("compress_rate", "mem_len", "cmem_len"):
            value = getattr(self, name)
            if value is None and name != "compress_rate":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.span_loss not in SPAN_LOSSES:
            raise ValueError(
                f"span_loss must be one of {', '.join(SPAN_LOSSES)}, got {self.span_loss!r}"
            )
        if self.compress_fn not in COMPRESSION_FUNCTIONS:
            raise ValueError(
                f"compress_fn must be one of {', '.join(COMPRESSION_FUNCTIONS)}, "
                f"got {self.compress_fn!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, rejecting unknown keys (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**values)
