"""Memory policies: what a layer keeps, how it masks attention, and its auxiliary loss.

A new policy is one new file defining a :class:`MemoryPolicy` subclass plus one line in
``_REGISTRY`` below.
"""

from __future__ import annotations

from expire_span.config import ModelConfig
from expire_span.policies.adaptive_span import AdaptiveSpanPolicy
from expire_span.policies.base import PROBE_BIAS, BlockContext, MaskDecision, MemoryPolicy
from expire_span.policies.compressive import CompressivePolicy
from expire_span.policies.expire_span import ExpireSpanPolicy
from expire_span.policies.transformer_xl import TransformerXLPolicy

_REGISTRY: dict[str, type[MemoryPolicy]] = {
    ExpireSpanPolicy.name: ExpireSpanPolicy,
    TransformerXLPolicy.name: TransformerXLPolicy,
    AdaptiveSpanPolicy.name: AdaptiveSpanPolicy,
    CompressivePolicy.name: CompressivePolicy,
}


def available_policies() -> list[str]:
    """Names accepted by ``ModelConfig.memory``."""
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[MemoryPolicy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown memory policy {name!r}; available: {', '.join(available_policies())}"
        ) from None


def build_policy(config: ModelConfig, layer_index: int) -> MemoryPolicy:
    return policy_class(config.memory)(config, layer_index)


__all__ = [
    "BlockContext",
    "MaskDecision",
    "MemoryPolicy",
    "PROBE_BIAS",
    "available_policies",
    "build_policy",
    "policy_class",
]
