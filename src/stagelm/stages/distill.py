"""Knowledge distillation: a student (a smaller `model=`, or a pruned checkpoint as `init_from`) learns to match a
frozen teacher's next-token distributions on the SFT conversations, mixed with the ordinary data loss:

    loss = alpha * KL + (1 - alpha) * cross-entropy on the assistant tokens

`divergence=forward` is KL(teacher || student) on the data's assistant tokens (classic distillation on the
teacher's logits). `on_policy=true` with `divergence=reverse` is GKD's on-policy variant: the student samples
replies to the batch's prompts and KL(student || teacher) is taken on its own tokens, so it learns from the states
it will actually visit. Compression uses the stage as its recovery step after pruning (`stagelm-compress`).

`fake_quant={bits: 4, group: 32, lm_head: int8, embeddings: fp32}` (the `int4` step's settings) is
quantization-aware distillation: the student computes with its weights as round-to-nearest quantization will
store them (`stagelm.compress.quantize.fake_quantize`, gradients straight through to the latent weights), so it
learns to answer well once quantized; validation measures that quantized model. Checkpoints hold the plain
latent weights, which the quantization step afterwards (`method: rtn`, same settings) turns into exactly the
model that was trained.

Validation is SFT's (`val/loss`, `val/exact_match`, `val/format_ok`, ...), plus `val/kl_to_teacher`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import MeanMetric

from stagelm.checkpoint import load_checkpoint, verify_against_manifest
from stagelm.compress.quantize import fake_quantize, latent_key
from stagelm.data.instruct import IGNORE_INDEX
from stagelm.errors import ConfigError
from stagelm.generation import generate
from stagelm.losses import DistillDivergence, distill_kl
from stagelm.stages.sft import SFTModule


class DistillModule(SFTModule):
    stage_name = "distill"
    frozen = ("teacher",)

    def __init__(
        self,
        *args: Any,
        teacher: str | None = None,
        alpha: float = 0.5,
        divergence: DistillDivergence = "forward",
        temperature: float = 1.0,
        on_policy: bool = False,
        on_policy_max_new_tokens: int = 48,
        fake_quant: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not teacher:
            raise ConfigError("stage=distill needs a teacher: pass teacher=PATH (any stagelm checkpoint)")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"stage.alpha={alpha} must be in [0, 1]")
        if divergence not in ("forward", "reverse"):
            raise ConfigError(f"stage.divergence={divergence!r} must be 'forward' or 'reverse'")
        self.teacher_path, self.alpha, self.divergence, self.temperature = teacher, alpha, divergence, temperature
        self.on_policy, self.on_policy_max_new_tokens = on_policy, on_policy_max_new_tokens
        self.input_digests["teacher"] = verify_against_manifest(teacher, "teacher")
        loaded = load_checkpoint(teacher)
        if loaded.tokenizer.to_dict() != self.tokenizer.to_dict():
            raise ConfigError(f"teacher={teacher} uses a different tokenizer than the student")
        self.teacher = loaded.model.requires_grad_(False).eval()
        self.val_kl = MeanMetric()
        self.fake_quantized: list[str] = []
        if fake_quant:
            try:
                self.fake_quantized = fake_quantize(self.model, **fake_quant)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"stage.fake_quant={dict(fake_quant)}: {e}") from None

    def kl(
        self, logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, attention_mask=None
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids, attention_mask, with_router_stats=False).logits
        return distill_kl(logits, teacher_logits, mask, self.divergence, self.temperature)

    def on_policy_kl(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL on the student's own replies to the batch's prompts (everything before the first assistant token)."""
        labels = batch["labels"]
        first = (labels != IGNORE_INDEX).float().argmax(1)  # position predicting the first assistant token
        prompts = [row[: int(f) + 1].tolist() for row, f in zip(batch["input_ids"], first)]
        out = generate(
            self.model,
            prompts,
            self.on_policy_max_new_tokens,
            temperature=1.0,
            stop_tokens=self.tokenizer.reply_stop_ids,
            pad_id=self.tokenizer.pad_id,
        )
        ids, attention = out.sequences()
        P, N = out.prompt_ids.shape[1], out.tokens.shape[1]
        logits = self.forward_model(ids, attention).logits[:, P - 1 : P + N - 1]
        with torch.no_grad():
            teacher_logits = self.teacher(ids, attention, with_router_stats=False).logits[:, P - 1 : P + N - 1]
        return distill_kl(logits, teacher_logits, out.mask, self.divergence, self.temperature)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.forward_model(batch["input_ids"])
        ce = self.assistant_loss(out.logits, batch["labels"])
        if self.on_policy:
            kl = self.on_policy_kl(batch)
        else:
            kl = self.kl(out.logits, batch["input_ids"], batch["labels"] != IGNORE_INDEX)
        loss = self.alpha * kl + (1 - self.alpha) * ce
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        self.log("train/kl", kl)
        self.log("train/aux_loss", out.aux_loss)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log_throughput(int((batch["input_ids"] != self.tokenizer.pad_id).sum()))
        return loss + out.aux_loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        mask = batch["labels"] != IGNORE_INDEX
        logits = self.model(batch["input_ids"]).logits
        self.val_kl.update(self.kl(logits, batch["input_ids"], mask), weight=max(int(mask.sum()), 1))

    def on_validation_epoch_end(self) -> None:
        self.log("val/kl_to_teacher", self.val_kl.compute(), sync_dist=True)
        self.val_kl.reset()
        super().on_validation_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["stagelm"]["teacher"] = self.teacher_path
        if self.fake_quantized:  # the latent weights under their plain keys: an ordinary model's checkpoint
            checkpoint["state_dict"] = {latent_key(k): v for k, v in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.fake_quantized:  # resuming: the plain keys back to where the parametrized model keeps them
            parametrized = {latent_key(k): k for k in self.state_dict()}
            checkpoint["state_dict"] = {parametrized.get(k, k): v for k, v in checkpoint["state_dict"].items()}
