"""The memory Transformer: embeddings, attention with rotary positions, layers and output."""

from expire_span.model.generation import GeneratedToken, filter_logits, generate, generate_stream
from expire_span.model.transformer import MemoryTransformer, ModelOutput

__all__ = [
    "GeneratedToken",
    "MemoryTransformer",
    "ModelOutput",
    "filter_logits",
    "generate",
    "generate_stream",
]
