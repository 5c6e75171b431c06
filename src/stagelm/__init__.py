"""stagelm: train a Llama-4-style MoE language model from random weights through pre-training, SFT,
preference tuning and RL with verifiable rewards, on one backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from stagelm.model import Transformer
    from stagelm.tokenizer import Tokenizer


def load(path: str, map_location: Any = "cpu") -> tuple[Transformer, Tokenizer]:
    """Return (model, tokenizer) from any stagelm checkpoint, in eval mode."""
    from stagelm.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, map_location=map_location)
    return loaded.model, loaded.tokenizer
