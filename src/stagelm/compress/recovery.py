"""Distillation recovery after pruning: the pruned model is saved as a checkpoint and trained by `stagelm-train
stage=distill` (in a subprocess, exactly as a user would run it) with the original model as the teacher. With
`fake_quant` it is quantization-aware: the student trains as the quantization step after it will store it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagelm.checkpoint import load_checkpoint
from stagelm.compress.base import Calibration, Compression
from stagelm.compress.measure import save_compressed
from stagelm.compress.quantize import Quantize


class DistillRecovery:
    """`max_steps` of `stage=distill` from the current model, teacher = the original checkpoint. `teacher` and
    `workdir` are set by `stagelm-compress` before the step runs. `fake_quant` (the settings of the `int4` or
    `int8` step that follows: bits, group, lm_head, embeddings) trains with those weights fake-quantized; the
    model it returns holds the latent weights, dense, for that step (`method: rtn`) to quantize."""

    def __init__(
        self,
        max_steps: int = 300,
        alpha: float = 0.5,
        lr: float = 3e-4,
        divergence: str = "forward",
        batch_size: int = 32,
        fake_quant: Mapping[str, Any] | None = None,
    ) -> None:
        self.max_steps, self.alpha, self.lr, self.divergence, self.batch_size = (
            max_steps,
            alpha,
            lr,
            divergence,
            batch_size,
        )
        self.fake_quant = dict(fake_quant) if fake_quant else None
        if self.fake_quant:  # bad settings fail here, not minutes later in the training subprocess
            Quantize(**self.fake_quant, method="rtn")
        self.teacher: str | None = None
        self.workdir: Path | None = None

    def command(self, student: Path, run_dir: Path) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "stagelm.cli.train",
            "stage=distill",
            "logger=none",
            f"hydra.run.dir='{run_dir}'",
            f"init_from='{student}'",
            f"teacher='{self.teacher}'",
            f"trainer.max_steps={self.max_steps}",
            f"trainer.val_check_interval={self.max_steps}",
            f"stage.alpha={self.alpha}",
            f"stage.optimizer.lr={self.lr}",
            f"stage.divergence={self.divergence}",
            f"data.batch_size={self.batch_size}",
            "checkpoint_every_n_steps=0",
        ]
        if self.fake_quant:
            command.append("stage.fake_quant={" + ",".join(f"{k}:{v}" for k, v in self.fake_quant.items()) + "}")
        return command

    def __call__(self, c: Compression, calib: Calibration | None = None) -> Compression:
        if c.encodings:
            raise ValueError(
                "distillation recovery trains dense weights: put it before quantization, sparsity and low rank"
            )
        if self.teacher is None or self.workdir is None:
            raise ValueError("DistillRecovery needs teacher and workdir (stagelm-compress sets them)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        student = save_compressed(c, self.workdir / "student.ckpt")
        run_dir = self.workdir / "run"
        env = {**os.environ, "WANDB_MODE": "disabled"}
        result = subprocess.run(self.command(student, run_dir), env=env, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise RuntimeError(f"distillation recovery failed (exit {result.returncode}):\n{tail}")
        loaded = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        quant = (
            f", weights fake-quantized {self.fake_quant}: this row measures the dense latent weights, the "
            "quantization step's row the model that was trained"
            if self.fake_quant
            else ""
        )
        c.notes.append(
            f"distillation recovery: {self.max_steps} steps of stage=distill (alpha {self.alpha}, "
            f"{self.divergence} KL{quant})"
        )
        return Compression(loaded.model, c.tokenizer, {}, c.notes)
