"""Trainer plumbing shared by all stages: atomic checkpoint writes, a `last.ckpt` that is always the latest state
(also when the run is stopped by SIGTERM or SIGINT), skipping optimizer steps with non-finite numbers, and a
logger-independent metrics history."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stagelm.checkpoint import atomic_torch_save
from stagelm.errors import StagelmError

log = logging.getLogger("stagelm")


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


class Preempted(StagelmError):
    """The run was stopped by a signal after saving `last.ckpt` at a step boundary."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; the run's state is saved in {path}. Run the same command again with "
            f"ckpt_path=auto (or ckpt_path={path}) to resume it"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by the signal


class LastCheckpoint(Checkpoint):
    """`<dirpath>/last.ckpt` is always the run's latest state, whatever the monitored metric does: written after
    every validation, every `every_n_steps` optimizer steps, at the end of training, and when SIGTERM (a SLURM
    preemption) or SIGINT (Ctrl-C) stops the run. A signal only sets a flag; the run stops at the next step
    boundary (all processes at the same step under DDP), so the saved state is never half an update. A second
    SIGINT interrupts at once. Files are written through the trainer's checkpoint IO (atomic: `AtomicCheckpointIO`).
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_steps: int = 0) -> None:
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self._saved_step: int | None = None
        self._period = 0  # global_step // every_n_steps at the last periodic save
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILENAME

    def save(self, trainer: L.Trainer) -> None:
        if self._saved_step == trainer.global_step and self.path.exists():
            return
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    # --- signals --------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._previous_handlers:  # outside a fit (Lightning may re-install this handler when it tears down)
            previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous)
            signal.raise_signal(signum)
            return
        if signum == signal.SIGINT and self._signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step to end
        self._signal = signum
        log.warning("received %s: saving last.ckpt at the end of this step, then stopping", signal.Signals(signum).name)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signal = None
        if trainer.is_global_zero:  # a save killed midway leaves its temporary file behind
            for stale in self.dirpath.glob(f".{self.FILENAME}.*.tmp"):
                stale.unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():
            # registered before Lightning's own SIGTERM handler, which then calls this one after its own
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        signalled = self._signal is not None
        if trainer.world_size > 1:  # one process may have the signal before the others: all stop at this step
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if signalled:
            self.save(trainer)
            raise Preempted(self._signal or signal.SIGTERM, trainer.global_step, self.path)

    # --- when to save -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._period = trainer.global_step // self.every_n_steps if self.every_n_steps else 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # a period boundary crossed, not hit: a GRPO batch with mu > 1 advances the step count by mu
        if self.every_n_steps and trainer.global_step // self.every_n_steps > self._period:
            self._period = trainer.global_step // self.every_n_steps
            self.save(trainer)
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM handling stops at the end of a step (after validation) with this exception
        if isinstance(exception, SIGTERMException):
            self.save(trainer)


class NonFiniteError(StagelmError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(Callback):
    """Skips an optimizer step whose loss or gradients are not finite (NaN or inf) and counts it
    (`train/skipped_steps`); after `max_consecutive` skipped steps in a row the run stops with an error naming the
    step and the first non-finite tensor, and `last.ckpt` keeps the last good state (a skipped step leaves the
    weights and the optimizer state untouched).

    It works at the two hooks every optimizer step passes through, in automatic and manual optimization alike
    (when it goes through Lightning's optimizer): `on_before_backward` sees each loss, `on_before_optimizer_step`
    the gradients. Skipping sets every gradient to None: torch's optimizers leave such parameters, their moments
    and their step counts alone. Under DDP the gradients are already averaged, so every process skips alike."""

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.skipped, self.in_a_row = 0, 0
        self._bad_loss: str | None = None  # the first non-finite loss since the last optimizer step
        self._first_bad: str | None = None  # what the first skipped step of the current run of skips had

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = f"the loss ({float(loss.detach().float().flatten()[0])})"

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad, self._bad_loss = self._bad_loss, None
        if bad is None:
            bad = first_nonfinite_gradient(pl_module, optimizer)
        if bad is None:
            self.in_a_row, self._first_bad = 0, None
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.in_a_row += 1
        self._first_bad = self._first_bad or bad
        step = trainer.global_step + 1  # the step being taken
        pl_module.log("train/skipped_steps", float(self.skipped))
        log.warning("step %d: non-finite value in %s; optimizer step skipped (%d in a row)", step, bad, self.in_a_row)
        if self.in_a_row >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} optimizer steps in a row had non-finite values "
                f"(first: {self._first_bad}; this step: {bad}); stopped, the last checkpoint holds the last good state"
            )


def first_nonfinite_gradient(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The name of the first parameter of `optimizer` whose gradient holds a NaN or inf, or None."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = [(name, p.grad) for name, p in module.named_parameters() if id(p) in stepped and p.grad is not None]
    if not named:
        return None
    norms = torch._foreach_norm([g for _, g in named])  # one pass over the gradients, as clipping does
    finite = torch.isfinite(torch.stack(norms))
    if bool(finite.all()):
        return None
    return f"the gradient of {named[int((~finite).nonzero()[0])][0]}"
