"""The stagelm backbone: a Llama-4-style Mixture-of-Experts transformer."""

from stagelm.model.config import ModelConfig
from stagelm.model.layers import KVCache
from stagelm.model.transformer import Transformer, TransformerOutput

__all__ = ["KVCache", "ModelConfig", "Transformer", "TransformerOutput"]
