"""Stage 3b, direct preference optimisation (DPO, Rafailov et al. 2023): the policy learns from preference pairs
directly, with no reward model and no sampling during training. With pi and ref the summed log-probs of a reply's
tokens under the trained policy and the frozen reference (the SFT checkpoint it starts from),
h = (pi_c - ref_c) - (pi_r - ref_r) and the loss is

- `sigmoid` (DPO): -log sigmoid(beta h) (with optional label smoothing, conservative DPO);
- `ipo` (Azar et al. 2023): (h - 1/(2 beta))^2;
- `hinge` (SLiC, Zhao et al. 2023): relu(1 - beta h);

with `positive_lambda` (DPO-Positive, Pal et al. 2024) h less lambda times how far the chosen reply fell below the
reference, so that the margin cannot grow by lowering both replies; plus, with `nll_coef`, the chosen reply's
per-token negative log-likelihood (RPO, Pang et al. 2024), which keeps the chosen replies likely while the margin
grows; with `replay.coef`, that times the cross-entropy on a batch of SFT-style conversations (`stagelm.replay`),
which keeps what the single-turn pairs never show (tool calls, later turns). Reference log-probs are computed on the
fly (default) or once for every pair before training (`precompute_ref: true`: one forward pass per pair instead of
one per step).

Logs `train/loss`, `train/rewards_chosen`, `train/rewards_rejected` (implicit rewards beta * (pi - ref)),
`train/margin`, `train/accuracy`; on held-out pairs `val/loss`, `val/accuracy` (the implicit reward ranks the pair
right), `val/margin`; and by greedy generation on held-out prompts, judged by the small world's true preference
(`world.judge`) against the SFT reference's greedy replies: `val/win_rate_vs_sft` (ties count half),
`val/judge_score` (and `val/judge_score_sft`), `val/correct` (and `val/correct_sft`: right final answers), with a
table of sample replies. The reference is rebuilt from `init_from`, never saved in checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchmetrics import CatMetric, MeanMetric

from stagelm.chat import parse_assistant
from stagelm.data import world
from stagelm.data.preference import PreferencePair
from stagelm.errors import ConfigError
from stagelm.evaluation import format_ok, generate_replies, win_score
from stagelm.losses import dpo_loss, sequence_logprobs, sum_by_sequence
from stagelm.replay import SFTReplay
from stagelm.stages.base import StageModule

log = logging.getLogger("stagelm")


class DPOModule(StageModule):
    stage_name = "dpo"
    frozen = ("ref_model",)

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        positive_lambda: float = 0.0,
        nll_coef: float = 0.0,
        precompute_ref: bool = False,
        eval_max_new_tokens: int = 64,
        eval_batch_size: int = 100,
        sample_rows: int = 8,
        replay: Callable[..., SFTReplay] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.replay = replay(tokenizer=self.tokenizer) if replay is not None else None
        if not self.init_from:
            raise ConfigError(
                "stage=dpo needs init_from=PATH: the SFT checkpoint is both the policy's start and the frozen reference"
            )
        if loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ConfigError(f"stage.loss_type: expected 'sigmoid', 'ipo' or 'hinge', found {loss_type!r}")
        if beta <= 0:
            raise ConfigError(f"stage.beta must be > 0, found {beta}")
        if positive_lambda < 0:
            raise ConfigError(f"stage.positive_lambda must be >= 0, found {positive_lambda}")
        self.positive_lambda = positive_lambda
        self.beta, self.loss_type, self.label_smoothing, self.nll_coef = beta, loss_type, label_smoothing, nll_coef
        self.precompute_ref = precompute_ref
        self.eval_max_new_tokens, self.eval_batch_size, self.sample_rows = (
            eval_max_new_tokens,
            eval_batch_size,
            sample_rows,
        )
        self.ref_model = self.frozen_reference()
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_pair_margin, self.val_index = CatMetric(), CatMetric()  # per pair, for the report's intervals
        self._sft_replies: list[str] | None = None  # the reference's greedy replies to the eval prompts, once

    # --- log-probabilities ----------------------------------------------------------------------------------
    def reply_logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed log-probs of the chosen replies [B], of the rejected replies [B], MoE aux loss), one forward."""
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # [2B, T]
        reply = torch.cat([batch["chosen_reply_mask"], batch["rejected_reply_mask"]])
        out = model(input_ids)  # right-padded: the plain causal path is exact
        mask = reply[:, 1:]
        logps = sum_by_sequence(sequence_logprobs(out.logits[:, :-1], input_ids[:, 1:], mask), mask)  # [2B]
        chosen, rejected = logps.chunk(2)
        return chosen, rejected, out.aux_loss

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        chosen, rejected, _ = self.reply_logps(self.ref_model, batch)
        return chosen, rejected

    def on_fit_start(self) -> None:
        if not self.precompute_ref:
            return
        dm = self.trainer.datamodule
        for data in (dm.train_data, dm.val_data):
            todo = [p for p in data if p.ref_chosen is None]
            loader = DataLoader(todo, batch_size=dm.batch_size, collate_fn=dm.collator())
            for pairs, batch in zip(_chunks(todo, dm.batch_size), loader):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                chosen, rejected = self.reference_logps(batch)
                for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
                    pair.ref_chosen, pair.ref_rejected = c, r
        log.info("reference log-probs precomputed for %d + %d pairs", len(dm.train_data), len(dm.val_data))

    # --- training -------------------------------------------------------------------------------------------
    def pair_loss(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[Any, torch.Tensor]:
        pi_chosen, pi_rejected, aux_loss = self.reply_logps(model, batch)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        out = dpo_loss(
            pi_chosen,
            pi_rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.loss_type,
            self.label_smoothing,
            self.positive_lambda,
        )
        loss = out.loss + aux_loss
        if self.nll_coef:
            n_tokens = batch["chosen_reply_mask"][:, 1:].sum(-1).clamp(min=1)
            loss = loss + self.nll_coef * (-pi_chosen / n_tokens).mean()
        return out, loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out, loss = self.pair_loss(batch, self.forward_model)
        if self.replay is not None and self.replay.enabled:
            replay_loss = self.replay.loss(self.forward_model, self.global_step)
            loss = loss + self.replay.coef * replay_loss
            self.log("train/replay_loss", replay_loss)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/rewards_chosen", out.chosen_rewards.mean())
        self.log("train/rewards_rejected", out.rejected_rewards.mean())
        self.log("train/margin", out.margins.mean())
        self.log("train/accuracy", out.accuracy, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/truncated", float(getattr(self.trainer.datamodule, "truncated", 0)))
        tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
        self.log_throughput(int(tokens))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out, _ = self.pair_loss(batch, self.model)
        n = out.losses.numel()
        self.val_loss.update(out.loss, weight=n)
        self.val_accuracy.update((out.margins > 0).float())
        self.val_margin.update(out.margins)
        self.val_pair_margin.update(out.margins.detach())
        self.val_index.update(batch["index"].float())

    def on_validation_epoch_end(self) -> None:
        metrics = {
            "val/loss": self.val_loss.compute(),
            "val/accuracy": self.val_accuracy.compute(),
            "val/margin": self.val_margin.compute(),
        }
        if self.val_index.update_count:
            margins = self.val_pair_margin.compute()[self.val_index.compute().argsort()]  # the pairs' own order
            self.record_items("val/accuracy", (margins > 0).float())
            self.record_items("val/margin", margins)
        for metric in (self.val_loss, self.val_accuracy, self.val_margin, self.val_pair_margin, self.val_index):
            metric.reset()
        judged, rows = self.evaluate()
        metrics.update(judged)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val/accuracy", "val/win_rate_vs_sft"), sync_dist=True)
        if not self.trainer.sanity_checking:
            self.log_samples("val/replies", ["prompt", "reply", "sft_reply", "judge", "judge_sft"], rows)

    # --- generation against the SFT reference ---------------------------------------------------------------
    def judgeable(self) -> list[PreferencePair]:
        """Held-out pairs whose prompt the world's judge can score (all built-in ones; user pairs with `answer`)."""
        pairs = []
        for pair in self.trainer.datamodule.eval_set():
            try:
                world.judge(pair.judge_input, "")
            except ValueError:
                continue
            pairs.append(pair)
        return pairs

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[list[Any]]]:
        pairs = self.judgeable()
        if not pairs:
            return {}, []
        prompts, tools = [p.prompt for p in pairs], [p.tools for p in pairs]
        if self._sft_replies is None:
            self._sft_replies = generate_replies(
                self.ref_model, self.tokenizer, prompts, tools, self.eval_max_new_tokens, self.eval_batch_size
            )
        replies = generate_replies(
            self.model, self.tokenizer, prompts, tools, self.eval_max_new_tokens, self.eval_batch_size
        )
        judged = [_judge(p, r) for p, r in zip(pairs, replies)]
        judged_sft = [_judge(p, r) for p, r in zip(pairs, self._sft_replies)]
        scores, sft = [j["score"] for j in judged], [j["score"] for j in judged_sft]
        wins = [win_score(s, b) for s, b in zip(scores, sft)]
        n = len(pairs)
        self.record_items("val/win_rate_vs_sft", wins)
        self.record_items("val/judge_score", scores)
        metrics = {
            "val/win_rate_vs_sft": sum(wins) / n,
            "val/judge_score": sum(scores) / n,
            "val/judge_score_sft": sum(sft) / n,
            # the judge's parts: most of what separates two well-formed replies is whether the answer is right
            "val/correct": sum(j["correct"] for j in judged) / n,
            "val/correct_sft": sum(j["correct"] for j in judged_sft) / n,
            "val/format_ok": sum(map(format_ok, replies)) / n,
        }
        rows = [
            [p.prompt[-1].get("content", ""), r, b, round(s, 3), round(sb, 3)]
            for p, r, b, s, sb in list(zip(pairs, replies, self._sft_replies, scores, sft))[: self.sample_rows]
        ]
        return metrics, rows


def _judge(pair: PreferencePair, reply: str) -> dict[str, float]:
    return world.judge_breakdown(pair.judge_input, parse_assistant(reply)["content"])


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
