"""Stage 2, supervised instruction fine-tuning: cross-entropy on the assistant tokens of chat conversations
(prompt, system, user and tool tokens are masked), starting from a pre-trained checkpoint.

Logs `train/loss`, `val/loss` (assistant tokens only), and by greedy generation on held-out prompts
`val/exact_match` (the final answer is right), `val/format_ok` (well formed, ends with `<|end|>`), the tool and
multi-turn metrics of `stagelm.chat_metrics` (`val/tool_decision`, `val/tool_args_exact`, `val/tool_result_used`,
`val/exact_match_turn2plus`), with a table of sample conversations."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from stagelm.chat_metrics import chat_behaviour_metrics
from stagelm.data.instruct import IGNORE_INDEX
from stagelm.evaluation import answer_conversations, by_family, format_ok
from stagelm.losses import assistant_nll
from stagelm.stages.base import StageModule


class SFTModule(StageModule):
    stage_name = "sft"

    def __init__(
        self, *args: Any, eval_max_new_tokens: int = 64, eval_batch_size: int = 100, sample_rows: int = 8, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.eval_max_new_tokens, self.eval_batch_size, self.sample_rows = (
            eval_max_new_tokens,
            eval_batch_size,
            sample_rows,
        )
        self.val_loss = MeanMetric()

    def assistant_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return assistant_nll(logits, labels, IGNORE_INDEX)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.forward_model(batch["input_ids"])
        loss = self.assistant_loss(out.logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/aux_loss", out.aux_loss)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/truncated", float(getattr(self.trainer.datamodule, "truncated", 0)))
        self.log_throughput(int((batch["input_ids"] != self.tokenizer.pad_id).sum()))
        return loss + out.aux_loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(batch["input_ids"])
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        self.val_loss.update(self.assistant_loss(out.logits, batch["labels"]), weight=max(n, 1))

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=True)
        self.val_loss.reset()
        metrics, rows = self.evaluate()
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val/exact_match", "val/format_ok"), sync_dist=True)
        if not self.trainer.sanity_checking:
            self.log_samples("val/conversations", ["prompt", "reply", "reference", "correct"], rows)

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[list[Any]]]:
        conversations = self.trainer.datamodule.eval_set()
        if not conversations:
            return {}, []
        replies, correct = answer_conversations(
            self.model, self.tokenizer, conversations, self.eval_max_new_tokens, self.eval_batch_size
        )
        well_formed = [format_ok(r) for r in replies]
        metrics = {"val/exact_match": sum(correct) / len(correct), "val/format_ok": sum(well_formed) / len(replies)}
        self.record_items("val/exact_match", correct)
        self.record_items("val/format_ok", well_formed)
        for family, oks in by_family([c.family for c in conversations], correct).items():
            metrics[f"val/exact_match_{family}"] = sum(oks) / len(oks)
            self.record_items(f"val/exact_match_{family}", oks)
        metrics |= chat_behaviour_metrics(
            self.model, self.tokenizer, conversations, replies, self.eval_max_new_tokens, self.eval_batch_size
        )
        rows = [
            [c.prompt[-1].get("content", ""), r, c.reference, ok]
            for c, r, ok in list(zip(conversations, replies, correct))[: self.sample_rows]
        ]
        return metrics, rows
