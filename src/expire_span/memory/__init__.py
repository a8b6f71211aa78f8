"""Cached hidden states and the absolute steps they were produced at."""

from expire_span.memory.cache import LayerMemory, Memory

__all__ = ["LayerMemory", "Memory"]
