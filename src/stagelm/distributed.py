"""Multi-device strategies that need Python objects (not just strings) to configure."""

from __future__ import annotations

from typing import Any


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False, **kwargs: Any):
    """Lightning FSDP with one shard unit per transformer block (GPU only; Lightning's FSDP refuses CPU)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from stagelm.model.transformer import Block

    return FSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        **kwargs,
    )
