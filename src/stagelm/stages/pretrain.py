"""Stage 1, pre-training: next-token cross-entropy on raw text plus the MoE auxiliary losses.

Logs `train/loss`, `val/loss`, `val/bpc` (bits per character), the learning rate, tokens per second, and for MoE
layers the expert load and router entropy; samples a few completions at each validation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import CatMetric, MeanMetric

from stagelm.stages.base import StageModule


class PretrainModule(StageModule):
    stage_name = "pretrain"

    def __init__(
        self,
        *args: Any,
        sample_prompts: list[str] | None = None,
        sample_tokens: int = 64,
        log_router_every: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sample_prompts = list(sample_prompts or [])
        self.sample_tokens, self.log_router_every = sample_tokens, log_router_every
        self.val_loss = MeanMetric()
        self.val_window_loss = CatMetric()  # per validation window, for the report's intervals

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        out = self.forward_model(inputs)
        ce = self.cross_entropy(out.logits, targets)
        loss = ce + out.aux_loss
        self.log("train/loss", ce, prog_bar=True)
        self.log("train/aux_loss", out.aux_loss)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log_throughput(inputs.numel())
        if out.router_stats and self.global_step % self.log_router_every == 0:
            for layer, stats in out.router_stats.items():
                self.log(f"router/entropy_layer{layer}", stats.router_entropy)
                self.log(f"router/max_load_layer{layer}", stats.expert_load.max())
                for e, share in enumerate(stats.expert_load.tolist()):
                    self.log(f"router/load_layer{layer}_expert{e}", share)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        out = self.model(inputs)
        per_token = F.cross_entropy(
            out.logits.reshape(-1, out.logits.size(-1)).float(), targets.reshape(-1), reduction="none"
        )
        self.val_loss.update(per_token.mean(), weight=targets.numel())
        self.val_window_loss.update(per_token.view(targets.shape).mean(-1))  # windows are all block_size long

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        chars_per_token = getattr(self.trainer.datamodule, "val_chars_per_token", 1.0)
        self.log("val/bpc", loss / math.log(2) / chars_per_token, sync_dist=True)
        if self.val_window_loss.update_count:
            windows = self.val_window_loss.compute()
            self.record_items("val/loss", windows)
            self.record_items("val/bpc", windows / math.log(2) / chars_per_token)
        self.val_window_loss.reset()
        if self.sample_prompts and not self.trainer.sanity_checking:
            self.log_samples("val/samples", ["prompt", "completion"], self.sample_completions())

    @torch.no_grad()
    def sample_completions(self) -> list[list[str]]:
        from stagelm.generation import complete

        texts = complete(self.model, self.tokenizer, self.sample_prompts, self.sample_tokens, greedy=True)
        return [[p, t] for p, t in zip(self.sample_prompts, texts)]
