"""Stage 4, reasoning fine-tuning with verifiable rewards (RLVR) by Group Relative Policy Optimization.

GRPO (Shao et al. 2024, "DeepSeekMath") needs no value model: for each prompt it samples a group of G replies,
scores them with pure reward functions (`stagelm.rewards`: correctness of the final answer, format, length) and
uses each reply's reward relative to its group as the advantage of every one of its tokens. One step:

1. sample G replies to each of the batch's prompts with the KV-cache sampler (prompts x G rows in one batch),
   keeping the sampler's log-probabilities as the "old" policy;
2. score them; advantages `(r - mean_group) / std` (`scale_rewards`: group, batch, or none as in Dr. GRPO,
   Liu et al. 2025); a group whose rewards are all equal carries no signal;
3. `mu` optimisation passes on that batch, each minimising the clipped surrogate with separate lower and upper
   clip ranges (DAPO's clip-higher, Yu et al. 2025) plus `beta` times the k3 KL estimate to the frozen reference
   (skipped, reference and all, when beta is 0), aggregated per sequence (grpo) or per token (dapo, dr_grpo);
   with `replay.coef > 0`, plus that times the cross-entropy on a batch of SFT-style conversations
   (`stagelm.replay`), so that what the problems never exercise (tool calls, later turns) is kept.

The first pass also checks that the training forward reproduces the sampler's log-probabilities
(`grpo/logprob_max_diff`, near 0): the ratio starts at 1 only if the updates are truly on-policy.

`placebo: true` shuffles the rewards within each batch before computing advantages: the same amount of training at
the same learning rate on the same samples, but no information from the verifier. Comparing with it is how a gain
is credited to the reward rather than to extra training (which alone can add points to an under-trained model).

Validation: greedy accuracy on held-out problems (`val/accuracy`, per level), `val/pass@k` (`pass_k` samples at
`eval_temperature`), the share of replies in the rewarded format, and a table of sample replies.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import CatMetric, MeanMetric

from stagelm.errors import ConfigError
from stagelm.losses import GRPOLoss, group_advantages, grpo_loss, masked_mean
from stagelm.model import Transformer
from stagelm.replay import SFTReplay
from stagelm.rewards import REWARD_FUNCTIONS, BatchRewards, correctness_reward, format_reward, score_batch
from stagelm.rollout import Rollout, completion_logprobs, greedy_replies, sample_rollouts, select_rows
from stagelm.stages.base import StageModule
from stagelm.tokenizer import Tokenizer

log = logging.getLogger("stagelm")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


@dataclass
class MicroBatch:
    rollout: Rollout  # some rows of the batch's rollout, their all-padding columns dropped
    advantages: torch.Tensor  # [rows]
    weight: float  # its share of the batch's loss: rows / B (grpo, dr_grpo) or tokens / all tokens (dapo)


class PassStats:
    """Token-weighted statistics of one optimisation pass over the micro-batches, for logging."""

    def __init__(self) -> None:
        self.loss, self.tokens, self.max_diff, self.aux_loss = 0.0, 0, 0.0, 0.0
        self.replay_loss: float | None = None  # the SFT replay's loss, when it is on
        self.sums: dict[str, float] = defaultdict(float)

    def add(
        self,
        chunk: MicroBatch,
        result: GRPOLoss,
        logp: torch.Tensor,
        entropy: torch.Tensor,
        aux_loss: torch.Tensor,
        n_chunks: int,
    ) -> None:
        mask = chunk.rollout.completion_mask
        n = int(mask.sum())
        self.loss += float(result.loss.detach()) * chunk.weight
        self.aux_loss += float(aux_loss) / n_chunks
        self.tokens += n
        for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "kl"):
            self.sums[name] += float(getattr(result, name)) * n
        self.sums["entropy"] += float(masked_mean(entropy, mask)) * n
        self.max_diff = max(self.max_diff, float(((logp - chunk.rollout.logprobs).abs() * mask).max()))

    def mean(self, name: str) -> float:
        return self.sums[name] / max(self.tokens, 1)


def is_correct(reply: str, answer: str) -> bool:
    return correctness_reward(reply, answer) == 1.0


@torch.no_grad()
def evaluate_problems(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[list[int]],
    answers: list[str],
    levels: list[int | None] | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 100,
) -> dict[str, float]:
    """Held-out greedy accuracy, overall (`accuracy`) and per level (`accuracy_level<L>`), of any model: how the
    learning test and the README's before/after/placebo figures are measured (the same numbers as `val/accuracy`)."""
    levels = levels or [None] * len(answers)
    correct: list[bool] = []
    for start in range(0, len(prompt_ids), batch_size):
        replies = greedy_replies(model, tokenizer, prompt_ids[start : start + batch_size], max_new_tokens)
        correct += [is_correct(r, a) for r, a in zip(replies, answers[start : start + batch_size])]
    metrics = {"accuracy": sum(correct) / max(len(correct), 1)}
    for level in sorted({lv for lv in levels if lv is not None}):
        oks = [ok for ok, lv in zip(correct, levels) if lv == level]
        metrics[f"accuracy_level{level}"] = sum(oks) / len(oks)
    return metrics


class GRPOModule(StageModule):
    stage_name = "grpo"
    frozen = ("ref_model",)

    def __init__(
        self,
        *args: Any,
        rewards: dict[str, float] | None = None,
        reward_options: dict[str, dict[str, Any]] | None = None,
        reward_time_limit: float | None = 1.0,
        num_generations: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int = 96,
        mu: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.28,
        beta: float = 0.0,
        loss_aggregation: str = "grpo",
        scale_rewards: str = "group",
        placebo: bool = False,
        max_grad_norm: float | None = 1.0,
        micro_batch_size: int | None = None,
        skip_zero_advantage: bool = True,
        seed: int = 0,
        eval_max_new_tokens: int = 96,
        eval_temperature: float = 1.0,
        pass_k: int = 8,
        pass_k_examples: int = 100,
        sample_rows: int = 8,
        replay: Callable[..., SFTReplay] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.replay = replay(tokenizer=self.tokenizer) if replay is not None else None
        self.reward_weights = {str(k): float(v) for k, v in (_plain(rewards) or {"correctness": 1.0}).items()}
        unknown = sorted(set(self.reward_weights) - set(REWARD_FUNCTIONS))
        if unknown:
            raise ConfigError(f"stage.rewards: unknown reward function(s) {unknown}; known: {sorted(REWARD_FUNCTIONS)}")
        self.reward_options = {k: dict(v) for k, v in (_plain(reward_options) or {}).items()}
        if loss_aggregation not in ("grpo", "dapo", "dr_grpo"):
            raise ConfigError(f"stage.loss_aggregation={loss_aggregation!r}: expected grpo, dapo or dr_grpo")
        if scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"stage.scale_rewards={scale_rewards!r}: expected group, batch or none")
        if num_generations < 2:
            raise ConfigError(f"stage.num_generations={num_generations}: a group needs at least 2 replies")
        if mu < 1 or temperature <= 0:
            raise ConfigError(f"stage.mu={mu} must be >= 1 and stage.temperature={temperature} > 0")
        self.reward_time_limit, self.G, self.temperature = reward_time_limit, num_generations, temperature
        self.max_new_tokens, self.mu, self.beta = max_new_tokens, mu, beta
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.loss_aggregation, self.scale_rewards, self.placebo = loss_aggregation, scale_rewards, placebo
        self.max_grad_norm, self.seed = max_grad_norm, seed
        self.micro_batch_size, self.skip_zero_advantage = micro_batch_size, skip_zero_advantage
        self.eval_max_new_tokens, self.eval_temperature = eval_max_new_tokens, eval_temperature
        self.pass_k, self.pass_k_examples, self.sample_rows = pass_k, pass_k_examples, sample_rows
        # The reference is the starting policy: a frozen copy taken right after init_from was loaded (on resume too,
        # since the module is rebuilt from the same init_from before the checkpoint's policy weights are loaded).
        self.ref_model: Transformer | None = None
        if beta > 0:
            self.ref_model = self.frozen_reference()
        # per problem (their means are val/accuracy and val/pass@k): the report's intervals need the items
        self.val_accuracy, self.val_pass_k, self.val_format = CatMetric(), CatMetric(), MeanMetric()
        self.val_length = MeanMetric()
        self.val_by_level = nn.ModuleDict()
        self._val_rows: list[list[Any]] = []

    # --- training -----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        longest = getattr(datamodule, "max_prompt_length", 0) + max(self.max_new_tokens, self.eval_max_new_tokens)
        if longest > self.model_config.max_seq_len:
            raise ConfigError(
                f"data.max_prompt_length + stage.max_new_tokens = {longest} exceeds the model's "
                f"max_seq_len={self.model_config.max_seq_len}"
            )

    def _generator(self, offset: int) -> torch.Generator:
        # One stream per step, derived from the seed: the run is reproducible and a resumed run samples what the
        # uninterrupted one would have.
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + offset)

    def micro_batches(self, rollout: Rollout, advantages: torch.Tensor) -> list[MicroBatch]:
        """The rows to train on, sorted by prompt length and cut into micro-batches of micro_batch_size rows (all in
        one without it), each weighted so that the summed losses equal the whole batch's loss.

        Without a KL term a reply whose advantage is 0 (its group's rewards were all equal) adds exactly nothing to
        the loss, so it is left out of the forward pass (as DAPO's dynamic sampling drops such groups); sorting by
        prompt length keeps the left padding of each micro-batch small."""
        B, P = len(advantages), rollout.prompt_width
        rows = torch.arange(B, device=advantages.device)
        if self.skip_zero_advantage and self.beta == 0 and bool((advantages != 0).any()):
            rows = (advantages != 0).nonzero().squeeze(1)
        prompt_lengths = rollout.attention_mask[:, :P].sum(1)
        rows = rows[torch.argsort(prompt_lengths[rows], stable=True)]
        all_tokens = rollout.completion_mask.sum().clamp(min=1)
        chunks = []
        for part in rows.split(self.micro_batch_size or B):
            sub = select_rows(rollout, part)
            share = sub.completion_mask.sum() / all_tokens if self.loss_aggregation == "dapo" else len(part) / B
            chunks.append(MicroBatch(sub, advantages[part], float(share)))
        return chunks

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        generator = self._generator(self.global_step)
        started = time.perf_counter()
        rollout = sample_rollouts(
            self.model,
            self.tokenizer,
            batch["prompt_ids"],
            self.G,
            self.max_new_tokens,
            temperature=self.temperature,
            generator=generator,
        )
        sampled_in = time.perf_counter() - started
        answers = [a for a in batch["answers"] for _ in range(self.G)]  # rows are prompt-major
        scored = score_batch(
            rollout.replies,
            answers,
            self.reward_weights,
            options=self.reward_options,
            time_limit=self.reward_time_limit,
        )
        if scored.errors or scored.timeouts:
            log.warning(
                "grpo: %d reward error(s), %d timeout(s) scored 0; first: %s",
                scored.errors,
                scored.timeouts,
                scored.first_failure,
            )
        rewards = torch.tensor(scored.totals, dtype=torch.float32, device=self.device)  # [B*G]
        trained_on = rewards
        if self.placebo:  # the control run: same samples, rewards detached from the replies they belong to
            trained_on = rewards[torch.randperm(len(rewards), generator=generator, device=self.device)]
        advantages = group_advantages(trained_on, self.G, self.scale_rewards)  # [B*G]
        chunks = self.micro_batches(rollout, advantages)
        passes = self.optimise(chunks)
        self.log_step(rollout, scored, rewards, answers, chunks, passes, sampled_in)

    def optimise(self, chunks: list[MicroBatch]) -> list[PassStats]:
        """mu passes over the batch, one optimizer step each, the sampler's log-probs standing for the old policy."""
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        ref_logps: list[torch.Tensor | None] = [None] * len(chunks)
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logps = [completion_logprobs(self.ref_model, c.rollout, self.temperature)[0] for c in chunks]
        passes = []
        for _ in range(self.mu):
            optimizer.zero_grad()
            stats = PassStats()
            for chunk, ref_logp in zip(chunks, ref_logps):
                logp, entropy, out = completion_logprobs(self.forward_model, chunk.rollout, self.temperature)
                result = grpo_loss(
                    logp,
                    chunk.rollout.logprobs,
                    ref_logp,
                    chunk.advantages,
                    chunk.rollout.completion_mask,
                    self.epsilon_low,
                    self.epsilon_high,
                    self.beta,
                    self.loss_aggregation,
                    max_length=self.max_new_tokens,
                )
                # weighted by the chunk's share, the micro-batches' gradients add up to the whole batch's
                self.manual_backward(result.loss * chunk.weight + out.aux_loss / len(chunks))
                stats.add(chunk, result, logp.detach(), entropy.detach(), out.aux_loss.detach(), len(chunks))
            if self.replay is not None and self.replay.enabled:
                replay_loss = self.replay.loss(self.forward_model, self.global_step, len(passes))
                self.manual_backward(self.replay.coef * replay_loss)
                stats.replay_loss = float(replay_loss.detach())
            self.step_optimizer(optimizer, self.max_grad_norm)
            schedule.step()
            passes.append(stats)
        return passes

    def log_step(
        self,
        rollout: Rollout,
        scored: BatchRewards,
        rewards: torch.Tensor,
        answers: list[str],
        chunks: list[MicroBatch],
        passes: list[PassStats],
        sampled_in: float,
    ) -> None:
        lengths = rollout.completion_mask.sum(1).float()
        grouped = rewards.view(-1, self.G)
        correct = scored.per_function.get("correctness") or [
            correctness_reward(r, a) for r, a in zip(rollout.replies, answers)
        ]
        metrics = {
            "grpo/loss": sum(p.loss for p in passes) / len(passes),
            "grpo/reward_std": rewards.std(),
            "grpo/accuracy": sum(c == 1.0 for c in correct) / len(correct),
            "grpo/zero_std_frac": (grouped.amax(1) == grouped.amin(1)).float().mean(),
            "grpo/completion_len_mean": lengths.mean(),
            "grpo/completion_len_max": lengths.max(),
            "grpo/truncated_frac": 1 - rollout.finished.float().mean(),
            # over all passes: the first is on-policy (ratio 1), only later passes can clip
            "grpo/clip_ratio": sum(p.mean("clip_ratio") for p in passes) / len(passes),
            "grpo/clip_ratio_low": sum(p.mean("clip_ratio_low") for p in passes) / len(passes),
            "grpo/clip_ratio_high": sum(p.mean("clip_ratio_high") for p in passes) / len(passes),
            # the first pass scores the policy that sampled the batch: its log-probs must be the sampler's
            "grpo/entropy": passes[0].mean("entropy"),
            "grpo/logprob_max_diff": passes[0].max_diff,
            "grpo/trained_frac": sum(len(c.rollout) for c in chunks) / len(rewards),
            "grpo/reward_errors": float(scored.errors),
            "grpo/reward_timeouts": float(scored.timeouts),
            "grpo/sample_seconds": sampled_in,
            "rollout/tokens_per_sec": rollout.tokens_per_sec,
            "train/aux_loss": passes[-1].aux_loss,
            "train/lr": self.optimizers().param_groups[0]["lr"],
        }
        metrics.update({f"grpo/reward_{name}": v for name, v in scored.means().items() if name != "total"})
        if self.ref_model is not None:
            metrics["grpo/kl"] = passes[0].mean("kl")  # of the policy that sampled this batch
        if passes[-1].replay_loss is not None:
            metrics["grpo/replay_loss"] = sum(p.replay_loss for p in passes) / len(passes)
        self.log_dict(metrics, batch_size=len(rewards))
        self.log("grpo/reward_mean", rewards.mean(), prog_bar=True, batch_size=len(rewards))
        self.log_throughput(int(rollout.completion_mask.sum()))

    # --- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        prompt_ids, answers, levels = batch["prompt_ids"], batch["answers"], batch["levels"]
        replies = greedy_replies(self.model, self.tokenizer, prompt_ids, self.eval_max_new_tokens)
        correct = torch.tensor([is_correct(r, a) for r, a in zip(replies, answers)], dtype=torch.float32)
        self.val_accuracy.update(correct)
        self.val_format.update(torch.tensor([format_reward(r) == 1.0 for r in replies], dtype=torch.float32))
        self.val_length.update(torch.tensor([len(self.tokenizer.encode(r)) for r in replies], dtype=torch.float32))
        for level in {lv for lv in levels if lv is not None}:
            key = f"level{level}"
            if key not in self.val_by_level:
                self.val_by_level[key] = MeanMetric().to(self.device)
            self.val_by_level[key].update(correct[[lv == level for lv in levels]])
        # pass@k on the first pass_k_examples held-out prompts: is any of k samples right?
        start = batch_idx * getattr(self.trainer.datamodule, "eval_batch_size", len(prompt_ids))
        n = max(0, min(len(prompt_ids), self.pass_k_examples - start))
        if n and self.pass_k > 0:
            rollout = sample_rollouts(
                self.model,
                self.tokenizer,
                prompt_ids[:n],
                self.pass_k,
                self.eval_max_new_tokens,
                temperature=self.eval_temperature,
                generator=self._generator(-1 - batch_idx),
            )
            hits = torch.tensor([is_correct(r, answers[i // self.pass_k]) for i, r in enumerate(rollout.replies)])
            self.val_pass_k.update(hits.view(n, self.pass_k).any(1).float())
        if batch_idx == 0:
            self._val_rows = [
                [p, r, a, bool(ok)]
                for p, r, a, ok in list(zip(batch["prompts"], replies, answers, correct.tolist()))[: self.sample_rows]
            ]

    def on_validation_epoch_end(self) -> None:
        if self.val_accuracy.update_count == 0:
            return
        correct = self.val_accuracy.compute().float()
        self.record_items("val/accuracy", correct)
        self.log("val/accuracy", correct.mean(), prog_bar=True, sync_dist=True)
        self.log("val/format", self.val_format.compute(), sync_dist=True)
        self.log("val/completion_len", self.val_length.compute(), sync_dist=True)
        if self.val_pass_k.update_count:
            hits = self.val_pass_k.compute().float()
            self.record_items("val/pass@k", hits)
            self.log("val/pass@k", hits.mean(), sync_dist=True)  # k is stage.pass_k
        for key, metric in self.val_by_level.items():
            self.log(f"val/accuracy_{key}", metric.compute(), sync_dist=True)
            metric.reset()
        for metric in (self.val_accuracy, self.val_format, self.val_length, self.val_pass_k):
            metric.reset()
        if not self.trainer.sanity_checking:
            self.log_samples("val/samples", ["prompt", "reply", "answer", "correct"], self._val_rows)
