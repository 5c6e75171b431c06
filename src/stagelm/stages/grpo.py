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
   (skipped, reference and all, when beta is 0), aggregated per sequence (grpo) or per token (dapo, dr_grpo).

The first pass also checks that the training forward reproduces the sampler's log-probabilities
(`grpo/logprob_max_diff`, near 0): the ratio starts at 1 only if the updates are truly on-policy.

`placebo: true` shuffles the rewards within each batch before computing advantages: the same amount of training at
the same learning rate on the same samples, but no information from the verifier. Comparing with it is how a gain
is credited to the reward rather than to extra training (which alone can add points to an under-trained model).

Validation: greedy accuracy on held-out problems (`val/accuracy`, per level), `val/pass@k` (k samples at
`eval_temperature`), the share of replies in the rewarded format, and a table of sample replies.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric

from stagelm.errors import ConfigError
from stagelm.generation import generate
from stagelm.losses import group_advantages, grpo_loss, masked_mean
from stagelm.model import Transformer
from stagelm.rewards import REWARD_FUNCTIONS, correctness_reward, format_reward, score_batch
from stagelm.rollout import Rollout, completion_logprobs, sample_rollouts
from stagelm.stages.base import StageModule
from stagelm.tokenizer import END_OF_TURN, Tokenizer

log = logging.getLogger("stagelm")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def trim_rollout(rollout: Rollout) -> Rollout:
    """Drop the completion columns after the longest reply: the sampler always returns max_new_tokens columns, and
    a training forward over trailing padding would be wasted work."""
    width = max(int(rollout.completion_mask.sum(1).max()), 1)
    P = rollout.prompt_width
    return replace(
        rollout,
        input_ids=rollout.input_ids[:, : P + width],
        attention_mask=rollout.attention_mask[:, : P + width],
        completion_mask=rollout.completion_mask[:, :width],
        logprobs=rollout.logprobs[:, :width],
    )


@torch.no_grad()
def greedy_replies(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy replies to already-rendered prompts, ending with `<|end|>` when the model finished its turn."""
    stops = [tokenizer.token_id(END_OF_TURN), tokenizer.eos_id]
    out = generate(model, prompt_ids, max_new_tokens, greedy=True, stop_tokens=stops, pad_id=tokenizer.pad_id)
    return [tokenizer.decode(ids) for ids in out.completions()]


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
        seed: int = 0,
        eval_max_new_tokens: int = 96,
        eval_temperature: float = 1.0,
        pass_k: int = 8,
        pass_k_examples: int = 100,
        sample_rows: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen reference is rebuilt from init_from, never saved
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
        self.eval_max_new_tokens, self.eval_temperature = eval_max_new_tokens, eval_temperature
        self.pass_k, self.pass_k_examples, self.sample_rows = pass_k, pass_k_examples, sample_rows
        # The reference is the starting policy: a frozen copy taken right after init_from was loaded (on resume too,
        # since the module is rebuilt from the same init_from before the checkpoint's policy weights are loaded).
        self.ref_model: Transformer | None = None
        if beta > 0:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.val_accuracy, self.val_pass_k, self.val_format = MeanMetric(), MeanMetric(), MeanMetric()
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

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
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
        answers = [a for a in batch["answers"] for _ in range(self.G)]
        scored = score_batch(
            rollout.replies,
            answers,
            self.reward_weights,
            options=self.reward_options,
            time_limit=self.reward_time_limit,
        )
        if scored.first_failure and (scored.errors or scored.timeouts):
            log.warning(
                "grpo: %d reward error(s), %d timeout(s); first: %s",
                scored.errors,
                scored.timeouts,
                scored.first_failure,
            )
        rewards = torch.tensor(scored.totals, dtype=torch.float32, device=self.device)  # [B*G]
        trained_on = rewards
        if self.placebo:  # the control run: same samples, rewards detached from the replies they belong to
            permutation = torch.randperm(len(rewards), generator=generator, device=self.device)
            trained_on = rewards[permutation]
        advantages = group_advantages(trained_on, self.G, self.scale_rewards)  # [B*G]

        rollout = trim_rollout(rollout)
        mask = rollout.completion_mask
        ref_logp = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logp = completion_logprobs(self.ref_model, rollout, self.temperature)[0]
        results = []
        for step in range(self.mu):
            logp, entropy, out = completion_logprobs(self.forward_model, rollout, self.temperature)
            if step == 0:
                max_diff = ((logp.detach() - rollout.logprobs).abs() * mask).max()
                mean_entropy = masked_mean(entropy.detach(), mask)
            result = grpo_loss(
                logp,
                rollout.logprobs,
                ref_logp,
                advantages,
                mask,
                self.epsilon_low,
                self.epsilon_high,
                self.beta,
                self.loss_aggregation,
                max_length=self.max_new_tokens,
            )
            optimizer.zero_grad()
            self.manual_backward(result.loss + out.aux_loss)
            if self.max_grad_norm:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            schedule.step()
            results.append(result)

        lengths = mask.sum(1).float()
        grouped = rewards.view(-1, self.G)
        per_function = scored.means()
        accuracy = (
            scored.per_function["correctness"]
            if "correctness" in scored.per_function
            else [correctness_reward(r, a) for r, a in zip(rollout.replies, answers)]
        )
        metrics = {
            "grpo/loss": torch.stack([r.loss.detach() for r in results]).mean(),
            "grpo/reward_std": rewards.std() if len(rewards) > 1 else torch.zeros(()),
            "grpo/accuracy": sum(a == 1.0 for a in accuracy) / len(accuracy),
            "grpo/zero_std_frac": (grouped.amax(1) == grouped.amin(1)).float().mean(),
            "grpo/completion_len_mean": lengths.mean(),
            "grpo/completion_len_max": lengths.max(),
            "grpo/truncated_frac": 1 - rollout.finished.float().mean(),
            # over all passes: the first is on-policy (ratio 1), only later passes can clip
            "grpo/clip_ratio": torch.stack([r.clip_ratio for r in results]).mean(),
            "grpo/clip_ratio_low": torch.stack([r.clip_ratio_low for r in results]).mean(),
            "grpo/clip_ratio_high": torch.stack([r.clip_ratio_high for r in results]).mean(),
            "grpo/entropy": mean_entropy,
            "grpo/logprob_max_diff": max_diff,
            "grpo/reward_errors": float(scored.errors),
            "grpo/reward_timeouts": float(scored.timeouts),
            "grpo/sample_seconds": sampled_in,
            "train/aux_loss": out.aux_loss.detach(),
            "train/lr": optimizer.param_groups[0]["lr"],
        }
        metrics.update({f"grpo/reward_{name}": value for name, value in per_function.items() if name != "total"})
        if ref_logp is not None:
            metrics["grpo/kl"] = results[0].kl  # of the policy that sampled this batch
        self.log_dict(metrics, batch_size=len(rewards))
        self.log("grpo/reward_mean", rewards.mean(), prog_bar=True, batch_size=len(rewards))
        self.log_throughput(int(mask.sum()))

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
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=True)
        self.log("val/format", self.val_format.compute(), sync_dist=True)
        self.log("val/completion_len", self.val_length.compute(), sync_dist=True)
        if self.val_pass_k.update_count:
            self.log(f"val/pass@{self.pass_k}", self.val_pass_k.compute(), sync_dist=True)
        for key, metric in self.val_by_level.items():
            self.log(f"val/accuracy_{key}", metric.compute(), sync_dist=True)
            metric.reset()
        for metric in (self.val_accuracy, self.val_format, self.val_length, self.val_pass_k):
            metric.reset()
        if not self.trainer.sanity_checking:
            self.log_samples("val/samples", ["prompt", "reply", "answer", "correct"], self._val_rows)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("ref_model.")]:
            del state[key]
