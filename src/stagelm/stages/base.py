"""What every stage shares: the backbone built from a ModelConfig (optionally initialised from the checkpoint of
the stage before), AdamW with weight decay only on matrices, a warmup + cosine schedule, throughput logging, the
stagelm metadata that makes every checkpoint self-sufficient, and what makes a resume exact: the RNG states and
`tokens_seen` in every checkpoint, the digests of the inputs it was built from, frozen models (references, reward
models) rebuilt rather than saved, and one optimizer-step convention for the manual-optimization stages."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn

from stagelm.checkpoint import (
    load_checkpoint,
    load_weights_strict,
    stagelm_metadata,
    submodule_state,
    verify_against_manifest,
)
from stagelm.errors import CheckpointError
from stagelm.model import ModelConfig, Transformer
from stagelm.tokenizer import Tokenizer

OptimizerFactory = Callable[[Iterable[dict[str, Any]]], torch.optim.Optimizer]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (attention, MLP and expert weights, heads); never norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _no_closure() -> None:
    """Manual optimization computes the loss and gradients before stepping."""


def rng_states() -> dict[str, Any]:
    """Every random stream a step may draw from (dropout, sampling without an explicit generator, shuffles), as
    tensors and plain values, so the checkpoint still loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StageModule(L.LightningModule):
    """Base LightningModule: subclasses implement training_step/validation_step for their objective."""

    stage_name = "base"
    # attributes holding frozen models (a reference policy, a reward model): rebuilt from their paths when the
    # module is built (on resume too), kept in eval mode, and never saved in checkpoints
    frozen: tuple[str, ...] = ()

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        optimizer: OptimizerFactory,
        init_from: str | None = None,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model_config, self.tokenizer = model_config, tokenizer
        self.optimizer_factory = optimizer
        self.weight_decay, self.warmup_steps, self.min_lr_ratio = weight_decay, warmup_steps, min_lr_ratio
        self.init_from = init_from
        self.model = Transformer(model_config)
        # sha256 of every checkpoint this run is built from (init_from; PPO adds its reward model)
        self.input_digests: dict[str, str] = {}
        if init_from:
            self.input_digests["init_from"] = verify_against_manifest(init_from, "init_from")
            self.load_backbone(init_from)
        # compile the inner nn.Module only: Dynamo cannot trace Lightning's self.log. The eager alias stays the
        # registered submodule (every checkpoint holds its keys) and the compiled wrapper lives outside the module
        # tree, so a checkpoint's keys never depend on `compile`: a run compiled by compile=auto at 100,000 steps
        # resumes eager at fewer, and the other way round.
        self.forward_model = self.model
        if compile:
            self.__dict__["forward_model"] = torch.compile(self.model)
        self._step_started: float | None = None
        self.tokens_seen = 0  # training tokens over all processes, kept across resumes (checkpoint metadata)
        self.run_config: dict[str, Any] | None = None  # the resolved Hydra config, saved in checkpoints
        # the latest validation's per-item values behind its mean metrics (see record_items)
        self.val_items: dict[str, list[float]] = {}
        if self.frozen:
            self.strict_loading = False  # checkpoints leave the frozen models out

    def frozen_reference(self) -> Transformer:
        """The frozen reference policy (DPO, PPO, GRPO): a copy of the policy as it starts, i.e. of `init_from`.
        A resumed run rebuilds it the same way, from the same (manifest-checked) `init_from`."""
        return copy.deepcopy(self.model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> StageModule:
        super().train(mode)
        for name in self.frozen:  # Lightning puts the whole module in train mode; frozen models never are
            if (module := getattr(self, name, None)) is not None:
                module.eval()
        return self

    def load_backbone(self, path: str) -> None:
        loaded = load_checkpoint(path)
        if loaded.model_config != self.model_config:
            diffs = [
                f"{k}: expected {v}, found {loaded.model_config.to_dict()[k]}"
                for k, v in self.model_config.to_dict().items()
                if loaded.model_config.to_dict()[k] != v
            ]
            raise CheckpointError(f"init_from={path} does not fit the model config: " + "; ".join(diffs))
        load_weights_strict(self.model, submodule_state(loaded.state_dict, "model."), path)

    # --- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(parameter_groups(self, self.weight_decay))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10_000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def step_optimizer(self, optimizer: LightningOptimizer, max_grad_norm: float | None, count: bool = True) -> None:
        """One update in manual optimization (PPO, GRPO): clip, step through Lightning's strategy and precision
        plugin (so mixed precision, sharded strategies, `on_before_optimizer_step` hooks and the non-finite guard
        all see it), zero the gradients. `count=False` leaves the trainer's step count alone: PPO counts one
        trainer step per iteration, however many mini-batch updates it holds."""
        if max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        if count:
            optimizer.step()
        else:  # what LightningOptimizer.step does, without its progress bookkeeping
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure, model=self)
        optimizer.zero_grad()

    # --- throughput ---------------------------------------------------------------------------------------------
    def log_throughput(self, tokens: int) -> None:
        """Log tokens/s of this step and the running total of tokens trained on (all processes)."""
        tokens *= self.trainer.world_size
        self.tokens_seen += tokens
        self.log("train/tokens_seen", float(self.tokens_seen))
        # time between successive calls spans a whole step: forward, backward, optimizer, data
        now = time.perf_counter()
        if self._step_started is not None:
            self.log("train/tokens_per_sec", tokens / max(now - self._step_started, 1e-9), prog_bar=True)
        self._step_started = now

    # --- checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stagelm"] = stagelm_metadata(
            self.model_config,
            self.tokenizer,
            self.stage_name,
            run_config=self.run_config,
            tokens_seen=self.tokens_seen,
            inputs=self.input_digests,
        )
        prefixes = tuple(f"{name}." for name in self.frozen)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if prefixes and k.startswith(prefixes)]:
            del state[key]

        checkpoint["rng"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("stagelm", {}).get("inputs", {})
        for role, digest in recorded.items():
            if role in self.input_digests and self.input_digests[role] != digest:
                raise CheckpointError(
                    f"{role} changed since this run started (sha256 {self.input_digests[role][:16]}..., the run "
                    f"began from {digest[:16]}...): resuming would rebuild a different frozen model; start afresh"
                )
        self.tokens_seen = int(checkpoint.get("stagelm", {}).get("tokens_seen", 0))
        self._rng_to_restore = checkpoint.get("rng")

    def on_train_start(self) -> None:
        # restored here rather than on load: building the data loaders in between must not consume the stream
        if getattr(self, "_rng_to_restore", None):
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # --- per-item outcomes ----------------------------------------------------------------------------------------
    def record_items(self, name: str, values: torch.Tensor | Sequence[float]) -> None:
        """Keep the per-item values whose mean is the validation metric `name` (one per held-out conversation,
        pair, prompt, problem or window, in the eval set's order), replacing the previous validation's: the CLI
        writes them to metrics.json ("before_items", "after_items") and the report's intervals come from them.
        The sanity check's partial validation is not kept."""
        if self.trainer.sanity_checking:
            return
        flat = values.detach().float().flatten().tolist() if torch.is_tensor(values) else [float(v) for v in values]
        self.val_items[name] = [round(v, 6) for v in flat]  # 6 digits: metrics.json stays small

    # --- sample tables --------------------------------------------------------------------------------------------
    def log_samples(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table of sampled text: a wandb Table where wandb logs, and always a text file beside the metrics."""
        if not rows or self.trainer is None or not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if hasattr(logger, "log_text"):  # WandbLogger
                logger.log_text(key=key, columns=columns, data=rows, step=self.global_step)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if log_dir:
            from pathlib import Path

            path = Path(log_dir) / f"{key.replace('/', '_')}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"--- step {self.global_step} ---\n")
                for row in rows:
                    f.write(" | ".join(str(c) for c in row) + "\n")
