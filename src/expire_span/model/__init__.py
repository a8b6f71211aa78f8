"""The memory Transformer (embeddings, attention with rotary positions, layers, output) and an
actor-critic agent built on it."""

from expire_span.model.agent import AgentOutput, MemoryAgent, agent_vocab_size
from expire_span.model.generation import GeneratedToken, filter_logits, generate, generate_stream
from expire_span.model.transformer import EncoderOutput, MemoryTransformer, ModelOutput

__all__ = [
    "AgentOutput",
    "EncoderOutput",
    "GeneratedToken",
    "MemoryAgent",
    "MemoryTransformer",
    "ModelOutput",
    "agent_vocab_size",
    "filter_logits",
    "generate",
    "generate_stream",
]
