"""The memory Transformer: embeddings, attention with rotary positions, layers and output."""

from expire_span.model.transformer import MemoryTransformer, ModelOutput, cross_entropy

__all__ = ["MemoryTransformer", "ModelOutput", "cross_entropy"]
