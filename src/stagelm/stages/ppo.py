"""Stage 3b, RLHF with PPO: the SFT policy answers prompts, a frozen reward model scores the replies, and PPO raises
the score while a per-token KL penalty keeps the policy near the SFT model (Ouyang et al. 2022, InstructGPT;
Ziegler et al. 2019; the recipe and its details follow Huang et al. 2024, "The N+ Implementation Details of RLHF
with PPO"; PPO itself is Schulman et al. 2017, GAE Schulman et al. 2016).

One training step is one PPO iteration:
1. rollout: sample a reply to each prompt of the batch with the KV cache (temperature ~1);
2. score: the reward model at each reply's last token, normalised by the SFT policy's score mean and std (so the
   KL coefficient and penalties are in units of the reward's spread), minus a penalty for replies that never end;
3. per-token rewards `-kl_coef * (logp - logp_ref)`, plus the score on the last token; values from the value
   model (a backbone and scalar head initialised from the reward model, or from the policy); GAE advantages,
   whitened over the batch;
4. `ppo_epochs` passes of shuffled mini-batch updates with the clipped policy loss and the clipped value loss;
5. the KL coefficient follows the adaptive controller (Ziegler et al. 2019) or stays fixed.

With `replay.coef > 0` every mini-batch update also adds that times the policy's cross-entropy on a batch of
SFT-style conversations (`stagelm.replay`: InstructGPT's PPO-ptx), which keeps the tool calls and later turns the
prompts never exercise.

The trainer counts one step per iteration (`trainer.max_steps`, `val_check_interval` and the LR schedule are in
iterations), however many mini-batch updates it holds.

Logs `ppo/*` per iteration (reward_mean is the raw reward-model score, kl the per-sequence KL to the reference,
true_preference the world's judge of the sampled replies) and at validation, from greedy replies to held-out
prompts: `val/rm_score`, `val/rm_score_sft` (the SFT policy, computed once), `val/rm_score_gain_sd`
((mean - mean_sft) / std_sft), `val/win_rate_vs_sft` (the world's judge; ties count half), `val/kl` (exact KL
to the reference summed over the greedy reply), with a table of samples. With `eval_sampled` the same metrics
are computed on replies sampled at the rollout temperature (a fixed stream per prompt), suffixed `_sampled`
(`val/win_rate_vs_sft_sampled`, ...): greedy decoding shows the policy's mode, sampling its whole distribution,
which is where an SFT policy trained on mixed-quality replies keeps most of its off-rule behaviour.

The reference and the reward model are rebuilt from their paths (`init_from`, `reward_model`) and never saved; the
policy is saved under `model.` (every tool loads it), the value model under `value_model.`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric

from stagelm.chat import parse_assistant
from stagelm.checkpoint import verify_against_manifest
from stagelm.errors import CheckpointError, ConfigError
from stagelm.evaluation import win_score
from stagelm.losses import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    masked_mean,
    masked_sum,
    penalize_missing_eos,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    token_kl,
    whiten,
)
from stagelm.model import Transformer
from stagelm.model.heads import ScalarHead
from stagelm.replay import SFTReplay
from stagelm.reward_model import RewardModel
from stagelm.rollout import Rollout, completion_logprobs, generate_rollout, sample_rollouts, select_rows
from stagelm.stages.base import StageModule, parameter_groups, warmup_cosine


class ValueModel(nn.Module):
    """A backbone with a scalar head: V at every position, [B, T]."""

    def __init__(self, backbone: Transformer, head: ScalarHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True, compute_logits=False)
        return self.head(out.hidden), out.aux_loss


def true_preference(messages: list[dict[str, Any]], answer: str | None, reply: str) -> float | None:
    """The built-in world's judge of a reply in [0, 1]; None for prompts it cannot judge (not of its world, no
    answer given)."""
    from stagelm.data import world

    record: dict[str, Any] = {"messages": messages} | ({"answer": answer} if answer is not None else {})
    try:
        return world.judge(record, parse_assistant(reply).get("content", ""))
    except ValueError:
        return None


class PPOModule(StageModule):
    stage_name = "ppo"
    frozen = ("ref_model", "reward_model")

    def __init__(
        self,
        *args: Any,
        reward_model: str | None = None,
        value_init: str = "reward",
        samples_per_prompt: int = 1,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float | None = None,
        ppo_epochs: int = 4,
        mini_batch_size: int = 8,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        vf_coef: float = 0.1,
        value_lr: float | None = None,
        separate_value_optimizer: bool = False,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        kl_coef: float = 0.05,
        adaptive_kl: bool = True,
        target_kl: float = 6.0,
        horizon: float = 10000,
        missing_eos_penalty: float | None = 1.0,
        missing_eos_mode: str = "subtract",
        normalize_scores: bool = True,
        calibration_prompts: int = 128,
        max_grad_norm: float | None = 1.0,
        eval_max_new_tokens: int = 64,
        eval_sampled: bool = True,
        sample_rows: int = 8,
        replay: Callable[..., SFTReplay] | None = None,
        **kwargs: Any,
    ) -> None:
        if not reward_model:
            raise ConfigError("stage=ppo needs a reward model: pass reward_model=PATH (a checkpoint of stage=reward)")
        if not kwargs.get("init_from"):
            raise ConfigError("stage=ppo starts from an SFT checkpoint: pass init_from=PATH")
        if value_init not in ("reward", "policy"):
            raise ConfigError(f"stage.value_init: expected 'reward' or 'policy', found {value_init!r}")
        if missing_eos_mode not in ("subtract", "replace"):
            raise ConfigError(f"stage.missing_eos_mode: expected 'subtract' or 'replace', found {missing_eos_mode!r}")
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.replay = replay(tokenizer=self.tokenizer) if replay is not None else None
        self.reward_model_path, self.value_init = reward_model, value_init
        self.samples_per_prompt, self.max_new_tokens, self.temperature, self.top_p = (
            samples_per_prompt,
            max_new_tokens,
            temperature,
            top_p,
        )
        self.ppo_epochs, self.mini_batch_size, self.clip_eps, self.value_clip_eps = (
            ppo_epochs,
            mini_batch_size,
            clip_eps,
            value_clip_eps,
        )
        self.vf_coef, self.value_lr, self.separate_value_optimizer = vf_coef, value_lr, separate_value_optimizer
        self.gamma, self.lam, self.max_grad_norm = gamma, lam, max_grad_norm
        self.whiten_advantages = whiten_advantages
        self.missing_eos_penalty, self.missing_eos_mode = missing_eos_penalty, missing_eos_mode
        self.normalize_scores, self.calibration_prompts = normalize_scores, calibration_prompts
        self.eval_max_new_tokens, self.sample_rows = eval_max_new_tokens, sample_rows
        self.kl_ctl = AdaptiveKLController(kl_coef, target_kl, horizon) if adaptive_kl else FixedKLController(kl_coef)

        self.ref_model = self.frozen_reference()
        self.input_digests["reward_model"] = verify_against_manifest(reward_model, "reward_model")
        rm = RewardModel.load(reward_model)
        if rm.tokenizer.to_dict() != self.tokenizer.to_dict():
            raise CheckpointError(
                f"reward_model={reward_model} uses a different tokenizer than init_from="
                f"{self.init_from}; train it from the same SFT lineage"
            )
        if value_init == "reward":
            value = ValueModel(copy.deepcopy(rm.backbone), copy.deepcopy(rm.head))
        else:
            value = ValueModel(copy.deepcopy(self.model), ScalarHead(self.model_config.d_model))
        self.value_model = value.requires_grad_(True).train()
        self.reward_model = rm.requires_grad_(False).eval()
        # reward-model scores of the SFT policy's samples: (score - mean) / std is what PPO optimises
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        self.register_buffer("score_calibrated", torch.zeros((), dtype=torch.bool))

        # greedy replies (val/...) and, with eval_sampled, replies sampled like the rollouts (val/..._sampled)
        self.val_metrics = nn.ModuleDict(
            {
                mode: nn.ModuleDict(
                    # per prompt where the report's intervals need the items (scores, KL, wins), else a mean
                    {name: CatMetric() for name in ("scores", "scores_sft", "kl", "win")}
                    | {name: MeanMetric() for name in ("pref", "pref_sft", "length", "no_eos", "no_eos_sft")}
                )
                for mode in (("greedy", "sampled") if eval_sampled else ("greedy",))
            }
        )
        self._sft_cache: dict[tuple[str, int], tuple[torch.Tensor, list[str], torch.Tensor]] = {}  # per val batch
        self._val_rows: list[list[Any]] = []

    # --- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[dict[str, Any]]:
        policy = parameter_groups(self.model, self.weight_decay)
        value = parameter_groups(self.value_model, self.weight_decay)
        if self.value_lr is not None:
            for group in value:
                group["lr"] = self.value_lr
        groups = [policy, value] if self.separate_value_optimizer else [policy + value]
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10_000
        configured = []
        for g in groups:
            optimizer = self.optimizer_factory(g)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, self.min_lr_ratio)
            )
            configured.append({"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}})
        return configured

    def lr_schedulers_list(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        return schedulers if isinstance(schedulers, list) else [schedulers]

    def _optimizer_step(self, count: bool) -> None:
        optimizers = self.optimizers()
        for i, opt in enumerate(optimizers if isinstance(optimizers, list) else [optimizers]):
            self.step_optimizer(opt, self.max_grad_norm, count=count and i == 0)

    # --- rollouts and scores ------------------------------------------------------------------------------------
    def _generator(self, offset: int) -> torch.Generator:
        # seeded by the run's seed and the step: a resumed run samples what the uninterrupted one would have
        return torch.Generator(device=self.device).manual_seed((torch.initial_seed() * 1_000_003 + offset) % 2**63)

    def rollout(self, prompt_ids: list[list[int]], offset: int) -> Rollout:
        rollout = sample_rollouts(
            self.model,
            self.tokenizer,
            prompt_ids,
            self.samples_per_prompt,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self._generator(offset),
        )
        # all rows, all-padding columns dropped; the sampler's wall time stays (rollout/tokens_per_sec reads it)
        return replace(select_rows(rollout, torch.arange(len(rollout))), seconds=rollout.seconds)

    @torch.no_grad()
    def calibrate_scores(self) -> None:
        """Mean and std of the reward model's scores on the SFT policy's samples (Huang et al. 2024 normalise the
        reward model this way): scores, penalties and the KL coefficient are then in units of the reward's spread."""
        batch = self.trainer.datamodule.calibration_batch(self.calibration_prompts)
        scores = []
        for start in range(0, len(batch["prompt_ids"]), 64):
            part = {k: v[start : start + 64] for k, v in batch.items()}
            scores.append(self.score(self.rollout(part["prompt_ids"], offset=-1 - start), part))
        scores = torch.cat(scores).float()
        self.score_mean.fill_(scores.mean())
        self.score_std.fill_(scores.std().clamp_min(1e-6) if len(scores) > 1 else 1.0)
        self.score_calibrated.fill_(True)
        if self.value_init == "reward":  # the value head starts as the reward model's: give it the same units
            proj = self.value_model.head.proj
            proj.weight.div_(self.score_std)
            proj.bias.sub_(self.score_mean).div_(self.score_std)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.normalize_scores and not bool(self.score_calibrated):
            self.calibrate_scores()

    def score(self, rollout: Rollout, batch: dict[str, Any]) -> torch.Tensor:
        """The reward model's score [B] of each reply, read at its last token (a subclass may score otherwise, e.g.
        with a gold reward to tell the reward model's limits from PPO's)."""
        return self.reward_model(rollout.input_ids, rollout.attention_mask).float()

    def shaped_scores(self, raw: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        score = (raw.float() - self.score_mean) / self.score_std if self.normalize_scores else raw.float()
        if self.missing_eos_penalty is not None:
            score = penalize_missing_eos(score, finished, self.missing_eos_penalty, self.missing_eos_mode)
        return score

    # --- one PPO iteration --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch["prompt_ids"], offset=self.global_step)
        mask = rollout.completion_mask
        with torch.no_grad():
            logp_old, entropy, _ = completion_logprobs(self.forward_model, rollout, self.temperature)
            logp_ref, _, _ = completion_logprobs(self.ref_model, rollout, self.temperature)
            values_old = self.completion_values(rollout)[0]
            raw_scores = self.score(rollout, batch)
            scores = self.shaped_scores(raw_scores, rollout.finished)
            kl_coef = self.kl_ctl.value
            rewards = ppo_rewards(scores, logp_old, logp_ref, mask, kl_coef)
            advantages, returns = gae(rewards, values_old, mask, self.gamma, self.lam)
            if self.whiten_advantages:  # unit scale whatever the rewards' spread (Huang et al. 2024)
                advantages = whiten(advantages, mask)
            seq_kl = masked_sum(logp_old - logp_ref, mask, dim=-1)  # [B], k1 per sequence

        stats = self.ppo_update(rollout, logp_old, values_old, advantages, returns)
        self.kl_ctl.update(float(seq_kl.mean()), len(rollout))
        for schedule in self.lr_schedulers_list():
            schedule.step()

        prompts = [(m, a) for m, a in zip(batch["messages"], batch["answers"]) for _ in range(self.samples_per_prompt)]
        judged = [true_preference(m, a, r) for (m, a), r in zip(prompts, rollout.replies)]
        judged = [j for j in judged if j is not None]
        metrics = {
            "ppo/reward_mean": raw_scores.mean(),
            "rollout/tokens_per_sec": rollout.tokens_per_sec,
            "ppo/score_mean": scores.mean(),  # normalised and penalised: what PPO optimises, before the KL
            "ppo/rlhf_reward": (scores - kl_coef * seq_kl).mean(),
            "ppo/kl": seq_kl.mean(),
            "ppo/kl_coef": kl_coef,
            "ppo/entropy": masked_mean(entropy, mask),
            "ppo/reply_length": mask.sum(1).float().mean(),
            "ppo/no_eos_fraction": 1 - rollout.finished.float().mean(),
            "ppo/explained_variance": explained_variance(values_old, returns, mask),
            "ppo/sampler_logprob_gap": ((logp_old - rollout.logprobs).abs() * mask).max(),  # on-policy check
            "train/lr": self.lr_schedulers_list()[0].get_last_lr()[0],
            **stats,
        }
        if judged:
            metrics["ppo/true_preference"] = sum(judged) / len(judged)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("ppo/reward_mean", "ppo/kl"))
        self.log_throughput(int(rollout.attention_mask.sum()))

    def completion_values(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """V [B, N] of the state before each completion token (the position that predicts it), and the aux loss."""
        values, aux = self.value_model(rollout.input_ids, rollout.attention_mask)
        P, N = rollout.prompt_width, rollout.completion_mask.shape[1]
        return values[:, P - 1 : P + N - 1] * rollout.completion_mask, aux

    def ppo_update(
        self,
        rollout: Rollout,
        logp_old: torch.Tensor,
        values_old: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        B = len(rollout)
        size = min(self.mini_batch_size, B)
        starts = list(range(0, B, size))
        order_rng = torch.Generator().manual_seed((torch.initial_seed() + self.global_step) % 2**63)
        history: dict[str, list[torch.Tensor]] = {}
        for epoch in range(self.ppo_epochs):
            order = torch.randperm(B, generator=order_rng).to(self.device)
            for start in starts:
                rows = order[start : start + size]
                sub = select_rows(rollout, rows)
                n = sub.completion_mask.shape[1]
                logp, _, out = completion_logprobs(self.forward_model, sub, self.temperature)
                values, value_aux = self.completion_values(sub)
                policy = ppo_policy_loss(
                    logp, logp_old[rows, :n], advantages[rows, :n], sub.completion_mask, self.clip_eps
                )
                value = ppo_value_loss(
                    values, values_old[rows, :n], returns[rows, :n], sub.completion_mask, self.value_clip_eps
                )
                loss = policy.loss + self.vf_coef * value.loss + out.aux_loss + value_aux
                if self.replay is not None and self.replay.enabled:
                    update = epoch * len(starts) + starts.index(start)
                    replay_loss = self.replay.loss(self.forward_model, self.global_step, update)
                    loss = loss + self.replay.coef * replay_loss
                    history.setdefault("ppo/replay_loss", []).append(replay_loss.detach().float())
                self.manual_backward(loss)
                self._optimizer_step(count=epoch == self.ppo_epochs - 1 and start == starts[-1])
                for name, v in (
                    ("policy_loss", policy.loss),
                    ("value_loss", value.loss),
                    ("clipfrac", policy.clip_fraction),
                    ("approx_kl", policy.approx_kl),
                    ("value_clipfrac", value.clip_fraction),
                    ("ratio", policy.ratio_mean),
                ):
                    history.setdefault(f"ppo/{name}", []).append(v.detach().float())
        return {name: torch.stack(values).mean() for name, values in history.items()}

    # --- validation on held-out prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, model: Transformer, prompt_ids: list[list[int]], sampled: bool, batch_idx: int) -> Rollout:
        """Greedy replies, or replies sampled at the rollout temperature from a stream fixed per batch (the same
        for every validation, so the SFT policy's samples, drawn once, stay comparable)."""
        generator = self._generator(-(10**6) - batch_idx) if sampled else None
        return generate_rollout(
            model, self.tokenizer, prompt_ids, self.eval_max_new_tokens, not sampled, self.temperature, None, generator
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for mode, metrics in self.val_metrics.items():
            sampled = mode == "sampled"
            answers = self.answer(self.model, batch["prompt_ids"], sampled, batch_idx)
            scores = self.reward_model(answers.input_ids, answers.attention_mask).float()
            if (mode, batch_idx) not in self._sft_cache:  # the reference is the SFT policy, and never changes
                sft = self.answer(self.ref_model, batch["prompt_ids"], sampled, batch_idx)
                sft_scores = self.reward_model(sft.input_ids, sft.attention_mask).float()
                self._sft_cache[mode, batch_idx] = (sft_scores, sft.replies, 1 - sft.finished.float())
            sft_scores, sft_replies, sft_no_eos = self._sft_cache[mode, batch_idx]

            # exact KL of the next-token distributions summed along the reply (for sampled replies, an unbiased
            # estimate of the sequence-level KL)
            P, N = answers.prompt_width, answers.completion_mask.shape[1]
            logits, ref_logits = (
                m(answers.input_ids, attention_mask=answers.attention_mask).logits[:, P - 1 : P + N - 1]
                for m in (self.model, self.ref_model)
            )
            metrics["kl"].update(masked_sum(token_kl(logits, ref_logits), answers.completion_mask, dim=-1))
            metrics["scores"].update(scores)
            metrics["scores_sft"].update(sft_scores)
            metrics["length"].update(answers.completion_mask.sum(1).float())
            metrics["no_eos"].update(1 - answers.finished.float())
            metrics["no_eos_sft"].update(sft_no_eos)
            for i, (messages, answer) in enumerate(zip(batch["messages"], batch["answers"])):
                mine = true_preference(messages, answer, answers.replies[i])
                theirs = true_preference(messages, answer, sft_replies[i])
                if mine is not None and theirs is not None:
                    metrics["win"].update(win_score(mine, theirs))
                    metrics["pref"].update(mine)
                    metrics["pref_sft"].update(theirs)
                if len(self._val_rows) < self.sample_rows * len(self.val_metrics) and i < self.sample_rows:
                    row = [mode, messages[-1].get("content", ""), answers.replies[i], sft_replies[i]]
                    self._val_rows.append(
                        row + [round(float(scores[i]), 3), round(float(sft_scores[i]), 3), mine, theirs]
                    )

    def on_validation_epoch_end(self) -> None:
        for mode, m in self.val_metrics.items():
            suffix = "" if mode == "greedy" else f"_{mode}"
            scores, sft = m["scores"].compute().float(), m["scores_sft"].compute().float()
            sft_std = sft.std() if sft.numel() > 1 else torch.ones(())
            kl = m["kl"].compute().float()
            metrics = {
                "val/rm_score": scores.mean(),
                "val/rm_score_sft": sft.mean(),
                "val/rm_score_gain_sd": (scores.mean() - sft.mean()) / sft_std.clamp_min(1e-6),
                "val/kl": kl.mean(),
                "val/reply_length": m["length"].compute(),
                "val/no_eos_fraction": m["no_eos"].compute(),
                "val/no_eos_fraction_sft": m["no_eos_sft"].compute(),
            }
            self.record_items("val/rm_score" + suffix, scores)
            self.record_items("val/kl" + suffix, kl)
            if m["win"].update_count:
                wins = m["win"].compute().float()
                self.record_items("val/win_rate_vs_sft" + suffix, wins)
                metrics["val/win_rate_vs_sft"] = wins.mean()
                metrics["val/true_preference"] = m["pref"].compute()
                metrics["val/true_preference_sft"] = m["pref_sft"].compute()
            for name, value in metrics.items():
                bar = mode == "greedy" and name in ("val/rm_score_gain_sd", "val/win_rate_vs_sft")
                self.log(name + suffix, value, prog_bar=bar, sync_dist=True)
            for metric in m.values():
                metric.reset()
        if not self.trainer.sanity_checking:
            columns = ["decoding", "prompt", "reply", "sft_reply", "rm", "rm_sft", "judge", "judge_sft"]
            self.log_samples("val/samples", columns, self._val_rows)
        self._val_rows = []

    # --- checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["stagelm"]["reward_model"] = self.reward_model_path
        checkpoint["ppo"] = {"kl_controller": self.kl_ctl.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ppo" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["ppo"]["kl_controller"])
