"""Stage 3a, the reward model: the SFT backbone with a scalar head read at the reply's last token, trained on
preference pairs with the Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected)` (InstructGPT, Ouyang et al.
2022), optionally with a margin (Llama 2, Touvron et al. 2023) and a reward-centering term (Eisenstein et al. 2023).
With `lm_coef`, the score adds lm_coef x the reply's log-likelihood under the backbone's own LM head (see
`stagelm.reward_model.RewardHead` for why a small model needs it to judge correctness).

Logs `train/loss`, `train/accuracy`, and on held-out pairs `val/accuracy` (pairs ranked right), `val/margin`
(mean r_chosen - r_rejected), `val/reward_mean` and `val/reward_std` (over all replies), and for the built-in
world `val/accuracy_<rule>` per preference rule. The checkpoint holds the backbone under `model.` and the head
under `reward_head.`; `stagelm.reward_model.RewardModel.load` turns it into a scorer (PPO's reward).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torchmetrics import CatMetric, MeanMetric

from stagelm.losses import bradley_terry_loss
from stagelm.reward_model import RewardHead, last_token_scores
from stagelm.stages.base import StageModule
from stagelm.tokenizer import ASSISTANT


class RewardModule(StageModule):
    stage_name = "reward"

    def __init__(
        self,
        *args: Any,
        margin: float = 0.0,
        center_coef: float = 0.0,
        head_init_std: float = 0.0,
        lm_coef: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.margin, self.center_coef = margin, center_coef
        self.reward_head = RewardHead(self.model_config.d_model, head_init_std, lm_coef)
        self.assistant_id = self.tokenizer.token_id(ASSISTANT)
        self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric()
        self.val_rewards, self.val_correct, self.val_index = CatMetric(), CatMetric(), CatMetric()
        self.val_gap = CatMetric()  # r_chosen - r_rejected per pair, for the report's intervals

    def pair_rewards(
        self, batch: dict[str, torch.Tensor], model: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r_chosen [B], r_rejected [B], aux loss) from one forward pass over both halves of the batch."""
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        # the collator right-pads, so the plain causal path is exact (and much faster than a [B, 1, T, T] mask)
        rewards, aux_loss = last_token_scores(model, self.reward_head, input_ids, mask, self.assistant_id, False)
        r_chosen, r_rejected = rewards.chunk(2)
        return r_chosen, r_rejected, aux_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r_chosen, r_rejected, aux_loss = self.pair_rewards(batch, self.forward_model)
        out = bradley_terry_loss(r_chosen, r_rejected, self.margin or None, self.center_coef)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/accuracy", out.accuracy, prog_bar=True)
        self.log("train/margin", out.margin)
        self.log("train/aux_loss", aux_loss)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/truncated", float(getattr(self.trainer.datamodule, "truncated", 0)))
        tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
        self.log_throughput(int(tokens))
        return out.loss + aux_loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r_chosen, r_rejected, _ = self.pair_rewards(batch, self.model)
        gap = r_chosen - r_rejected
        self.val_accuracy.update((gap > 0).float())
        self.val_margin.update(gap)
        self.val_rewards.update(torch.cat([r_chosen, r_rejected]))
        self.val_correct.update((gap > 0).float())
        self.val_index.update(batch["index"].float())
        self.val_gap.update(gap)

    def on_validation_epoch_end(self) -> None:
        rewards = self.val_rewards.compute()
        order = self.val_index.compute().argsort()  # the held-out pairs' own order, however processes split them
        self.record_items("val/accuracy", self.val_correct.compute()[order])
        self.record_items("val/margin", self.val_gap.compute()[order])
        metrics = {
            "val/accuracy": self.val_accuracy.compute(),
            "val/margin": self.val_margin.compute(),
            "val/reward_mean": rewards.mean(),
            "val/reward_std": rewards.std(),
        }
        metrics.update(self.accuracy_by_rule(self.val_index.compute(), self.val_correct.compute()))
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "val/accuracy", sync_dist=True)
        for metric in (
            self.val_accuracy,
            self.val_margin,
            self.val_rewards,
            self.val_correct,
            self.val_index,
            self.val_gap,
        ):
            metric.reset()

    def accuracy_by_rule(self, index: torch.Tensor, correct: torch.Tensor) -> dict[str, float]:
        """Built-in pairs know which rule the rejected reply breaks; ranking right per rule shows what was learnt."""
        pairs = getattr(self.trainer.datamodule, "val_pairs", [])
        by_rule: dict[str, list[float]] = defaultdict(list)
        for i, ok in zip(index.long().tolist(), correct.tolist()):
            if i < len(pairs) and pairs[i].rule:
                by_rule[pairs[i].rule].append(ok)
        return {f"val/accuracy_{rule}": sum(oks) / len(oks) for rule, oks in sorted(by_rule.items())}
