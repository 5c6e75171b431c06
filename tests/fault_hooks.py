"""Callbacks the fault-tolerance tests add to real runs (`+callbacks.<name>._target_=tests.fault_hooks.<Class>`):
which examples every step trained on, the numbers made non-finite at chosen steps, a digest of the weights after
every step, a signal sent in the middle of a validation."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch


def _row_ids(batch: Any) -> list[str]:
    """A short digest of each example of a batch: its token ids (for tensors) or its prompt ids (RL batches)."""
    if isinstance(batch, (tuple, list)):  # pre-training: (inputs, targets)
        rows = batch[0]
    elif "input_ids" in batch:  # SFT
        rows = batch["input_ids"]
    elif "chosen_input_ids" in batch:  # preference pairs: their index in the split is their id
        return [str(int(i)) for i in batch["index"]]
    else:  # prompts (PPO) and math problems (GRPO)
        rows = batch["prompt_ids"]
    as_lists = rows.tolist() if torch.is_tensor(rows) else rows
    return [hashlib.sha1(json.dumps(r).encode()).hexdigest()[:12] for r in as_lists]


class BatchRecorder(L.Callback):
    """Appends {"step", "ids"} for every training batch to a JSONL file, flushed at once (a kill -9 keeps it)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": trainer.global_step, "ids": _row_ids(batch)}) + "\n")


class InjectNonFinite(L.Callback):
    """At the chosen global steps (the step about to be taken), makes the backbone's output NaN in every forward
    pass with gradients (`where: loss`) or one gradient inf after backward (`where: grad`). Sampling, which runs
    without gradients, is left alone."""

    def __init__(self, steps: list[int], where: str = "loss") -> None:
        self.steps, self.where = set(steps), where
        self._handle: Any = None

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.global_step in self.steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.where == "loss" and self._handle is None:

            def poison(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
                if torch.is_grad_enabled() and self._active(trainer):
                    return output * float("nan")
                return output

            self._handle = pl_module.model.embed_tokens.register_forward_hook(poison)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.where == "grad" and self._active(trainer):
            grad = next(p for p in pl_module.model.parameters() if p.grad is not None).grad
            grad.view(-1)[0] = float("inf")


class WeightDigests(L.Callback):
    """Appends {"step", "digest"} after every training step: a digest of the policy's weights, to tell which steps
    changed them."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        h = hashlib.sha1()
        for tensor in pl_module.model.state_dict().values():
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "digest": h.hexdigest()}) + "\n")


class SignalDuringValidation(L.Callback):
    """Sends `signum` to this very process in the middle of the first validation of training: the moment Lightning's
    own SIGTERM handling, not the end-of-step check, stops the run."""

    def __init__(self, signum: int = 15) -> None:
        self.signum, self.sent = signum, False

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
