"""Trainer plumbing shared by all stages: atomic checkpoint writes and a logger-independent metrics history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from stagelm.checkpoint import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's default writes the file in place; a crash mid-write would leave a corrupt `last.ckpt`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


class MetricsHistory(Callback):
    """Appends every logged scalar to `history.jsonl` (one JSON object per step), whatever loggers are chosen:
    the run's report draws its curves from it."""

    def __init__(self, path: str, every_n_steps: int = 10) -> None:
        self.path, self.every_n_steps = Path(path), every_n_steps

    def _write(self, trainer: L.Trainer, prefixes: tuple[str, ...] | None) -> None:
        if not trainer.is_global_zero:
            return
        row: dict[str, float] = {"step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if (prefixes is None or key.startswith(prefixes)) and torch.is_tensor(value) and value.numel() == 1:
                row[key] = float(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0 and not trainer.sanity_checking:
            self._write(trainer, None)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/", "val_"))
