"""Trainer plumbing shared by all stages: atomic checkpoint writes."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from stagelm.checkpoint import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's default writes the file in place; a crash mid-write would leave a corrupt `last.ckpt`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)
