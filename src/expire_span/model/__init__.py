"""The memory Transformer (embeddings, attention with rotary positions, layers, output) and an
actor-critic agent built on it."""

from expire_span.model.agent import AgentOutput, MemoryAgent, agent_vocab_size
from expire_span.model.transformer import EncoderOutput, MemoryTransformer, ModelOutput

__all__ = [
    "AgentOutput",
    "EncoderOutput",
    "MemoryAgent",
    "MemoryTransformer",
    "ModelOutput",
    "agent_vocab_size",
]
