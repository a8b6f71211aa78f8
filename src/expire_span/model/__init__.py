"""The memory Transformer: embeddings, attention with rotary positions, layers and output."""

from expire_span.model.transformer import MemoryTransformer, ModelOutput

__all__ = ["MemoryTransformer", "ModelOutput"]
