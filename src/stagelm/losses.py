"""The losses and advantage estimators of every post-training stage, as pure tensor functions.

Nothing here knows about Lightning, models or configs: each function takes log-probabilities, rewards or values
with a boolean mask and returns tensors (or a small dataclass of them), so the stages stay thin and every formula
is unit-tested against numbers worked out by hand (tests/unit/test_losses.py).

Conventions used throughout:

- `B` replies (or pairs), `T` token positions, `V` vocabulary entries.
- `mask` is a `[B, T]` bool (or 0/1) tensor, True on the reply tokens that count; everything at masked-out positions
  is ignored by reductions and returned as 0 by per-token functions.
- "logp" tensors are per-token log-probabilities of the sampled/target tokens, `[B, T]`; sequence-level quantities
  (DPO) are their masked sums, `[B]`.
- Returned statistics (accuracies, clip fractions, KL estimates) are detached, ready to log; losses keep their graph.

Papers, per section: Bradley-Terry reward models (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback"; reward centering from Eisenstein et al. 2023, "Helping or Herding?");
DPO (Rafailov et al. 2023), IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences"), hinge/SLiC (Zhao et al. 2023); KL estimators (Schulman 2020, "Approximating KL Divergence");
PPO (Schulman et al. 2017) for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO"); GAE (Schulman et al. 2016); GRPO (Shao et al. 2024, DeepSeekMath),
Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), DAPO (Yu et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stagelm.model.heads import last_token_index

# ----------------------------------------------------------------------------------------------------------------
# Masked reductions and token log-probabilities
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is True (over `dim`, or everything)."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is True; 0 where nothing is selected (never NaN)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the selected entries of `x` (Bessel-corrected by default, as in Huang et al. 2024's whitening);
    0 when fewer than two entries are selected."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.bool().sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per-token log-probability of each target token, 0 where `mask` is False.

    logits [B, T, V] are already aligned with targets [B, T] (logits[:, t] predicts targets[:, t]; the caller shifts).
    Computed in float32 as `logit[target] - logsumexp(logits)`, which avoids materialising a full log-softmax copy;
    targets under the mask may hold any id (pad, -100): they are replaced before the gather.
    Returns [B, T].
    """
    mask = mask.bool()
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))  # [B, T], valid indices everywhere
    logits = logits.float()
    picked = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    logp = picked - torch.logsumexp(logits, dim=-1)  # [B, T]
    return torch.where(mask, logp, torch.zeros_like(logp))


def assistant_nll(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy (fp32) over the positions whose label is not ignore_index: SFT's loss, and the
    replay loss the RL stages keep. logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=ignore_index)


def sum_by_sequence(token_values: Tensor, mask: Tensor) -> Tensor:
    """Masked sum over the time axis: per-token log-probs [B, T] -> sequence log-probs [B] (as DPO uses them)."""
    return masked_sum(token_values, mask, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the predictive distribution at each position: [B, T, V] -> [B, T] (nats, float32)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RewardModelLoss:
    loss: Tensor  # scalar, with grad
    accuracy: Tensor  # fraction of pairs with r_chosen > r_rejected (ties count as wrong)
    margin: Tensor  # mean of r_chosen - r_rejected
    chosen: Tensor  # mean r_chosen
    rejected: Tensor  # mean r_rejected


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None, center_coef: float = 0.0
) -> RewardModelLoss:
    """Pairwise reward-model loss (Bradley-Terry, as in InstructGPT, Ouyang et al. 2022):

        loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)

    r_chosen, r_rejected: [B] scalar rewards. `margin` (Llama 2, Touvron et al. 2023) asks the chosen reply to win by
    at least that much. The centering term (Eisenstein et al. 2023) pins the otherwise free offset of the rewards
    near 0, which keeps PPO's per-token KL penalty and the score on comparable scales.
    """
    diff = r_chosen - r_rejected  # [B]
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        gap = (r_chosen - r_rejected).float()
        return RewardModelLoss(
            loss=loss,
            accuracy=(gap > 0).float().mean(),
            margin=gap.mean(),
            chosen=r_chosen.float().mean(),
            rejected=r_rejected.float().mean(),
        )


# ----------------------------------------------------------------------------------------------------------------
# DPO family
# ----------------------------------------------------------------------------------------------------------------

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


@dataclass
class DPOLoss:
    loss: Tensor  # scalar, with grad
    losses: Tensor  # [B] per pair, with grad
    chosen_rewards: Tensor  # [B] implicit reward beta * (pi_c - ref_c), detached
    rejected_rewards: Tensor  # [B] beta * (pi_r - ref_r), detached
    margins: Tensor  # [B] chosen_rewards - rejected_rewards
    accuracy: Tensor  # scalar: fraction of pairs whose implicit reward prefers the chosen reply


def dpo_loss(
    pi_chosen: Tensor,
    pi_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    positive_lambda: float = 0.0,
) -> DPOLoss:
    """Direct preference optimisation and its variants, on summed reply log-probs [B] of policy and reference.

    With h = (pi_c - ref_c) - (pi_r - ref_r):

    - "sigmoid" (DPO, Rafailov et al. 2023): -logsigmoid(beta h); with label_smoothing ls (conservative DPO,
      Mitchell 2023, for pairs whose label is wrong with probability ls):
      -(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h);
    - "ipo" (Azar et al. 2023): (h - 1/(2 beta))^2, which regresses h to a finite target instead of pushing it to
      infinity on deterministic preferences;
    - "hinge" (SLiC, Zhao et al. 2023): relu(1 - beta h).

    With ``positive_lambda`` lambda (DPO-Positive, Pal et al. 2024), h becomes h - lambda max(0, ref_c - pi_c): a
    pair whose chosen reply fell below the reference's likelihood counts as less won. On pairs a few tokens apart
    (a right and an off-by-one answer) plain DPO can widen the margin by lowering both replies, the right one too.

    The implicit rewards beta * (pi - ref) are returned for logging (DPO's reward accuracy and margins).
    """
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # [B]
    if positive_lambda:
        h = h - positive_lambda * torch.relu(ref_chosen - pi_chosen)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif label_smoothing:
        raise ValueError(f"label_smoothing applies to the sigmoid DPO loss only, not loss_type={loss_type!r}")
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (expected 'sigmoid', 'ipo' or 'hinge')")
    with torch.no_grad():
        chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
        rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
        margins = chosen_rewards - rejected_rewards
    return DPOLoss(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracy=(margins > 0).float().mean(),
    )


# ----------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(logp: Tensor, logp_ref: Tensor, kind: KLKind = "k3", mask: Tensor | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020, "Approximating KL Divergence").

    With log_ratio = logp - logp_ref:
    - k1 = log_ratio: unbiased, high variance, can be negative;
    - k2 = 0.5 * log_ratio^2: biased, low variance, >= 0;
    - k3 = exp(-log_ratio) + log_ratio - 1 = exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0 (GRPO's choice).
    Shapes: [B, T] -> [B, T]; 0 where `mask` is False.
    """
    log_ratio = logp - logp_ref
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    elif kind == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio  # exp(-x) - 1 + x, expm1 for accuracy near 0
    else:
        raise ValueError(f"unknown KL estimator {kind!r} (expected 'k1', 'k2' or 'k3')")
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


# ----------------------------------------------------------------------------------------------------------------
# PPO for RLHF
# ----------------------------------------------------------------------------------------------------------------


def ppo_rewards(score: Tensor, logp: Tensor, logp_ref: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token PPO rewards for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024):

        r_t = -kl_coef * (logp_t - logp_ref_t)            on every reply token (k1 KL penalty)
        r_T += score                                       on the last valid token of each reply

    score [B] (reward-model score of the whole reply), logp/logp_ref/mask [B, T] -> rewards [B, T], 0 off the mask.
    A row with no valid token gets nothing (its score is dropped).
    """
    mask = mask.bool()
    rewards = -kl_coef * (logp - logp_ref).float()  # [B, T]
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    last = last_token_index(mask).clamp_min(0)  # [B]; a row with no token (-1) gets a bonus of 0 anyway
    has_tokens = mask.any(-1)  # [B]
    bonus = torch.where(has_tokens, score.float(), torch.zeros_like(score, dtype=torch.float32))
    return rewards.scatter_add(-1, last.unsqueeze(-1), bonus.unsqueeze(-1))


MissingEosMode = Literal["subtract", "replace"]


def penalize_missing_eos(score: Tensor, finished: Tensor, penalty: float, mode: MissingEosMode = "subtract") -> Tensor:
    """Scores of replies that never ended (cut at max_new_tokens) are penalised, so the policy cannot raise its
    reward by rambling past the reward model's view (Huang et al. 2024, "EOS trick"):

    - "subtract": score - penalty (TRL's missing_eos_penalty);
    - "replace": -penalty, whatever the reward model said (Huang et al. 2024 replace it with -1).

    score [B] float, finished [B] bool -> [B]; finished replies keep their score.
    """
    if mode == "subtract":
        penalised = score - penalty
    elif mode == "replace":
        penalised = torch.full_like(score, -penalty)
    else:
        raise ValueError(f"unknown missing-EOS mode {mode!r} (expected 'subtract' or 'replace')")
    return torch.where(finished.bool(), score, penalised)


def token_kl(logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Exact KL(pi || pi_ref) between the full next-token distributions at each position (no sampling estimate):
    sum_v p(v) (log p(v) - log q(v)). logits, ref_logits [B, T, V] -> [B, T] (float32, >= 0), 0 where mask is False.
    Used to measure how far greedy replies have moved, where the sampled-token estimators do not apply."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over time, vectorised over the batch:

        delta_t = r_t + gamma * V_{t+1} - V_t            (V after the last valid token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]), both 0 off the mask and detached.
    Masked positions are skipped rather than treated as episode ends, so "next" means the next *valid* token:
    trailing padding is harmless and a masked span inside a reply (e.g. a tool result) does not cut it in two.
    """
    mask = mask.bool()
    rewards, values = rewards.float(), values.float()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # V_{t+1}
    next_adv = torch.zeros_like(next_value)  # A_{t+1}
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, torch.zeros_like(adv))
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to unit (Bessel-corrected) variance over the masked entries of the whole batch, and to zero mean
    unless shift_mean=False (then the mean is kept, as Huang et al. 2024 do for rewards). 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


@dataclass
class PolicyLoss:
    loss: Tensor  # scalar, with grad
    clip_fraction: Tensor  # fraction of valid tokens where the clipped objective is the active one
    approx_kl: Tensor  # 0.5 * mean((logp - logp_old)^2) (k2 estimate of KL(old || new), as in Huang et al. 2024)
    ratio_mean: Tensor  # mean importance ratio over valid tokens


def ppo_policy_loss(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, as in RLHF (Huang et al. 2024):

        loss = masked mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)),   r = exp(logp - logp_old)

    logp (with grad), logp_old, advantages, mask: [B, T].
    """
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        return PolicyLoss(
            loss=loss,
            clip_fraction=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean(0.5 * log_ratio.detach().float() ** 2, mask),
            ratio_mean=masked_mean(ratio.detach().float(), mask),
        )


@dataclass
class ValueLoss:
    loss: Tensor  # scalar, with grad
    clip_fraction: Tensor  # fraction of valid tokens where the clipped error is the larger one


def ppo_value_loss(
    values: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> ValueLoss:
    """Clipped value loss (Huang et al. 2024, detail on value clipping):

        loss = 0.5 * masked mean of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)

    values (with grad), values_old, returns, mask: [B, T].
    """
    v_clipped = values_old + torch.clamp(values - values_old, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        return ValueLoss(loss=loss, clip_fraction=masked_mean((err_clipped > err).float(), mask))


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 is a perfect value function, 0 no better than
    a constant, negative worse. NaN when the returns have no variance (nothing to explain)."""
    var_returns = masked_var(returns.float(), mask, unbiased=False)
    var_resid = masked_var((returns - values).float(), mask, unbiased=False)
    if var_returns == 0:
        return torch.tensor(float("nan"), device=returns.device)
    return 1 - var_resid / var_returns


class FixedKLController:
    """A constant KL coefficient, with the adaptive controller's interface."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"):

        err = clip(current_kl / target - 1, -0.2, 0.2);   coef *= 1 + err * n_steps / horizon

    so the coefficient grows while the policy's KL from the reference is above target and shrinks below it, at most
    by 20% per `horizon` samples. `n_steps` is the number of samples (episodes) since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + err * n_steps / self.horizon
        return self.value


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------

AdvantageScale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "dapo", "dr_grpo"]


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): A_i = (r_i - mean_group(r)) / (std + eps) where std is

    - "group": the (unbiased) std of the reply's own group (GRPO),
    - "batch": the (unbiased) std of all rewards in the batch (more robust when groups are nearly constant),
    - "none": no division at all (Dr. GRPO, Liu et al. 2025, which shows the std division biases toward
      too-easy/too-hard prompts).

    rewards: [N * G] (groups contiguous: prompt 0's G replies first) or [N, G] -> advantages of the same shape.
    A group whose rewards are all equal gets exactly 0 (it carries no signal), whatever the floating-point mean.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().reshape(-1, group_size)  # [N, G]
    centered = grouped - grouped.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(-1, keepdim=True, correction=1 if group_size > 1 else 0) + eps)
    elif scale == "batch":
        centered = centered / (grouped.std(correction=1 if grouped.numel() > 1 else 0) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r} (expected 'group', 'batch' or 'none')")
    constant = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)  # [N, 1]
    centered = torch.where(constant, torch.zeros_like(centered), centered)
    return centered.reshape(rewards.shape)


@dataclass
class GRPOLoss:
    loss: Tensor  # scalar, with grad
    clip_ratio: Tensor  # fraction of valid tokens whose clipped term is active (either side)
    clip_ratio_low: Tensor  # ... with ratio < 1 - eps_low and A < 0
    clip_ratio_high: Tensor  # ... with ratio > 1 + eps_high and A > 0
    kl: Tensor  # mean k3 KL to the reference over valid tokens (0 without a reference)


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor | None,
    logp_ref: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    aggregation: Aggregation = "grpo",
    max_length: int | None = None,
) -> GRPOLoss:
    """GRPO's clipped objective with a k3 KL penalty (Shao et al. 2024), as a loss to minimise. Per token:

        l_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta * k3_t,   ratio = exp(logp - logp_old)

    Decoupled eps_low/eps_high is DAPO's "clip-higher" (Yu et al. 2025). Aggregation over the valid tokens:

    - "grpo": mean over each reply's tokens, then mean over replies (long replies weigh less per token);
    - "dapo": sum over all tokens / number of valid tokens (token-level mean, Yu et al. 2025);
    - "dr_grpo": sum over all tokens / (replies x max_length) (Liu et al. 2025: a constant normaliser, no length
      bias); max_length defaults to mask.shape[1].

    logp (with grad), logp_old, logp_ref, mask: [B, T]; advantages: [B] (one per reply, broadcast over its tokens).
    logp_old=None means a single on-policy update (old = logp detached: ratio 1, same gradient). logp_ref=None turns
    the KL term off (then beta must be 0).
    """
    mask = mask.bool()
    if logp_old is None:
        logp_old = logp.detach()
    if logp_ref is None and beta:
        raise ValueError("grpo_loss: beta > 0 needs reference log-probs (logp_ref)")
    adv = advantages.reshape(-1, 1).to(logp.dtype)  # [B, 1]
    ratio = torch.exp(logp - logp_old)  # [B, T]
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    kl = kl_estimate(logp, logp_ref, "k3") if logp_ref is not None else None
    if kl is not None and beta:
        per_token = per_token + beta * kl

    B, T = mask.shape
    if aggregation == "grpo":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    elif aggregation == "dapo":
        loss = masked_mean(per_token, mask)
    elif aggregation == "dr_grpo":
        loss = masked_sum(per_token, mask) / (B * (max_length if max_length is not None else T))
    else:
        raise ValueError(f"unknown GRPO aggregation {aggregation!r} (expected 'grpo', 'dapo' or 'dr_grpo')")

    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        return GRPOLoss(
            loss=loss,
            clip_ratio=masked_mean((low | high).float(), mask),
            clip_ratio_low=masked_mean(low.float(), mask),
            clip_ratio_high=masked_mean(high.float(), mask),
            kl=masked_mean(kl.detach().float(), mask) if kl is not None else torch.zeros((), device=logp.device),
        )


# ----------------------------------------------------------------------------------------------------------------
# Knowledge distillation (Hinton et al. 2015; GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models")
# ----------------------------------------------------------------------------------------------------------------

DistillDivergence = Literal["forward", "reverse"]


def distill_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    divergence: DistillDivergence = "forward",
    temperature: float = 1.0,
) -> Tensor:
    """Mean over masked positions of the exact per-token KL between the teacher's and the student's next-token
    distributions at `temperature`, scaled by temperature^2 (Hinton's convention, so gradients keep their size).

    forward: KL(teacher || student), mass-covering, the classic distillation loss on the teacher's logits.
    reverse: KL(student || teacher), mode-seeking; on the student's own samples it is GKD's on-policy objective.
    logits [B, T, V], mask [B, T] -> scalar; 0 exactly when the two distributions agree."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if divergence == "forward":
        kl = token_kl(t, s, mask)
    elif divergence == "reverse":
        kl = token_kl(s, t, mask)
    else:
        raise ValueError(f"unknown divergence {divergence!r} (expected 'forward' or 'reverse')")
    return masked_sum(kl, mask) / mask.sum().clamp_min(1) * temperature**2
