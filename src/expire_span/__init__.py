"""expire-span: Transformers that learn which memories to keep.

Expire-Span (Sukhbaatar et al., ICML 2021) and the baselines it is judged against, as memory
policies of one block-recurrent Transformer.
"""

from expire_span.config import ModelConfig
from expire_span.memory import LayerMemory, Memory
from expire_span.model import MemoryTransformer, ModelOutput
from expire_span.policies import available_policies

__version__ = "0.1.0"

__all__ = [
    "LayerMemory",
    "Memory",
    "MemoryTransformer",
    "ModelConfig",
    "ModelOutput",
    "available_policies",
]
