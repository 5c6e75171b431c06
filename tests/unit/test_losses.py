"""Every loss and estimator in stagelm.losses against small examples worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from stagelm.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    dpo_loss,
    explained_variance,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    sequence_logprobs,
    sum_by_sequence,
    token_entropy,
    whiten,
)

LN2, LN3 = math.log(2), math.log(3)


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ log-probs


def test_sequence_logprobs_entropy_and_sum():
    # position 0: logits [ln 3, 0] -> softmax [3/4, 1/4]; position 1: logits [0, 0] -> [1/2, 1/2];
    # position 2 is padding (target -100, masked) and must come back as 0 without an index error.
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [5.0, -5.0]]])
    targets = torch.tensor([[1, 0, -100]])
    mask = torch.tensor([[True, True, False]])
    logp = sequence_logprobs(logits, targets, mask)
    close(logp, [[math.log(1 / 4), math.log(1 / 2), 0.0]])
    # sequence log-prob = ln(1/4) + ln(1/2) = ln(1/8)
    close(sum_by_sequence(logp, mask), [math.log(1 / 8)])
    # entropy: -(3/4 ln 3/4 + 1/4 ln 1/4) at position 0, ln 2 at position 1
    ent = token_entropy(logits)
    assert ent.shape == (1, 3)
    close(ent[0, :2], [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), LN2])


def test_sequence_logprobs_matches_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    expected = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    close(sequence_logprobs(logits, targets, mask), expected)


def test_masked_mean_ignores_masked_values_and_empty_mask_is_zero():
    x = torch.tensor([1.0, 2.0, float("inf")])
    close(masked_mean(x, torch.tensor([True, True, False])), 1.5)
    close(masked_mean(x, torch.tensor([False, False, False])), 0.0)


# ------------------------------------------------------------------------------------------------ reward model


def test_bradley_terry_loss_by_hand():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # r_c - r_r = [2, -1]; -logsigmoid(x) = ln(1 + e^-x)
    out = bradley_terry_loss(r_c, r_r)
    close(out.loss, (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)
    close(out.accuracy, 0.5)  # only the first pair is ranked right
    close(out.margin, 0.5)  # (2 + -1) / 2
    close(out.chosen, 1.0)
    close(out.rejected, 0.5)
    # margin 1: differences become [1, -2]
    close(bradley_terry_loss(r_c, r_r, margin=1.0).loss, (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2)
    # centering: (r_c + r_r)^2 = [4, 1], mean 2.5, times 0.1 = 0.25 on top of the plain loss
    close(bradley_terry_loss(r_c, r_r, center_coef=0.1).loss, out.loss + 0.25)


def test_bradley_terry_gradient_pushes_chosen_up():
    r_c = torch.tensor([0.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r).loss.backward()
    # d/dx of -logsigmoid(x) at 0 is -sigmoid(-0) = -1/2
    close(r_c.grad, [-0.5])
    close(r_r.grad, [0.5])


# ------------------------------------------------------------------------------------------------ DPO


# pair 0: pi_c=-1, pi_r=-3, ref_c=ref_r=-2 -> h = (-1+2) - (-3+2) = 2
# pair 1: pi_c=-2, pi_r=-1, ref_c=ref_r=-2 -> h = 0 - 1 = -1
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def test_dpo_sigmoid_by_hand():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    # beta h = [1, -0.5]; -logsigmoid(x) = ln(1 + e^-x)
    close(out.losses, [math.log(1 + math.exp(-1)), math.log(1 + math.exp(0.5))])
    close(out.loss, out.losses.mean())
    # implicit rewards beta (pi - ref): chosen [0.5, 0], rejected [-0.5, 0.5]
    close(out.chosen_rewards, [0.5, 0.0])
    close(out.rejected_rewards, [-0.5, 0.5])
    close(out.margins, [1.0, -0.5])
    close(out.accuracy, 0.5)


def test_dpo_label_smoothing_by_hand():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, label_smoothing=0.1)
    # -(0.9) logsigmoid(beta h) - 0.1 logsigmoid(-beta h), beta h = [1, -0.5]
    expected = [
        0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)),
        0.9 * math.log(1 + math.exp(0.5)) + 0.1 * math.log(1 + math.exp(-0.5)),
    ]
    close(out.losses, expected)


def test_dpo_ipo_and_hinge_by_hand():
    # IPO: (h - 1/(2 beta))^2 with beta 0.5 -> target 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="ipo").losses, [1.0, 4.0])
    # hinge: relu(1 - beta h): beta 0.5 -> relu(0) = 0, relu(1.5) = 1.5; beta 0.25 -> relu(0.5), relu(1.25)
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="hinge").losses, [0.0, 1.5])
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.25, loss_type="hinge").losses, [0.5, 1.25])
    with pytest.raises(ValueError):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="nope")  # type: ignore[arg-type]


def test_dpo_positive_by_hand():
    # DPOP: h - lambda relu(ref_c - pi_c). Pair 1's chosen fell 1 nat below the reference: h = -1 - (-3) = 2 -> 2 - 3
    # with lambda 3; pair 2's chosen rose (relu 0): h = 1 - 0 = 1 unchanged
    pi_c, pi_r = torch.tensor([-3.0, -1.0]), torch.tensor([-5.0, -2.0])
    ref_c, ref_r = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    out = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, positive_lambda=3.0)
    close(out.losses, [math.log(1 + math.exp(0.5)), math.log(1 + math.exp(-0.5))])
    close(out.margins, [1.0, 0.5])  # the implicit rewards' margin is DPO's own, for logging
    plain = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5).losses
    close(plain, [math.log(1 + math.exp(-1)), math.log(1 + math.exp(-0.5))])
    # the penalty's gradient lifts the fallen chosen reply: d/dpi_c = -beta sigmoid(-beta h) (1 + lambda)
    pi_c.requires_grad_(True)
    dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, positive_lambda=3.0).losses.sum().backward()
    close(pi_c.grad, [-0.5 * (1 / (1 + math.exp(-0.5))) * 4, -0.5 * (1 / (1 + math.exp(0.5)))])


def test_dpo_gradient_only_through_policy():
    pi_c = torch.tensor([-1.0], requires_grad=True)
    pi_r = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pi_c, pi_r, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.5).loss.backward()
    # h = 0: d/dpi_c of -logsigmoid(beta h) = -beta * sigmoid(0) = -0.25, and +0.25 for pi_r
    close(pi_c.grad, [-0.25])
    close(pi_r.grad, [0.25])


# ------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log ratio x = ln 0.5 - ln 0.25 = ln 2
    close(kl_estimate(logp, ref, "k1"), [LN2])
    close(kl_estimate(logp, ref, "k2"), [0.5 * LN2**2])
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    close(kl_estimate(logp, ref, "k3"), [0.5 + LN2 - 1])
    close(kl_estimate(logp, logp, "k3"), [0.0])
    close(kl_estimate(logp, ref, "k3", mask=torch.tensor([False])), [0.0])


def test_k3_is_nonnegative_and_unbiased():
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_estimate(a, b, "k3") >= 0).all()
    assert (kl_estimate(a, a, "k3") == 0).all()
    # the exact expectation under p of k1 and k3 is KL(p || q): p = [1/2, 1/2], q = [1/4, 3/4]
    # KL = 1/2 ln(2) + 1/2 ln(2/3)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    kl = 0.5 * LN2 + 0.5 * math.log(2 / 3)
    for kind in ("k1", "k3"):
        close((p * kl_estimate(p.log(), q.log(), kind)).sum(), kl)


# ------------------------------------------------------------------------------------------------ PPO


def test_ppo_rewards_kl_per_token_and_score_on_last_valid_token():
    # logp - logp_ref: row 0 [0.1, 0.2, 0.3] with mask [1, 1, 0]; row 1 [0.5, -0.5, 1.0] all valid; row 2 empty
    logp_ref = torch.zeros(3, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 1.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    score = torch.tensor([1.0, 2.0, 5.0])
    rewards = ppo_rewards(score, logp, logp_ref, mask, kl_coef=0.1)
    # -0.1 * diff per valid token; score on the last valid one (row 0: index 1, row 1: index 2); row 2: nothing
    close(rewards, [[-0.01, -0.02 + 1.0, 0.0], [-0.05, 0.05, -0.1 + 2.0], [0.0, 0.0, 0.0]])


def test_gae_by_hand_1x3():
    # gamma 0.9, lam 0.8 (gamma lam = 0.72), r = [0, 0, 1], V = [0.5, 0.6, 0.7], V after the end = 0
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                 A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03              A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04              A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]
    r, v = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_padding_and_holes_in_a_batch():
    r = torch.tensor([[0.0, 0.0, 1.0, 7.0], [0.0, 1.0, 5.0, 5.0], [0.0, 7.0, 1.0, 7.0]])
    v = torch.tensor([[0.5, 0.6, 0.7, 9.0], [0.5, 0.6, 9.0, 9.0], [0.5, 9.0, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    # row 0: the 1x3 example above, padding ignored
    close(adv[0], [0.21712, 0.246, 0.3, 0.0])
    # row 1: r = [0, 1], V = [0.5, 0.6]
    # t=1: delta = 1 - 0.6 = 0.4                A1 = 0.4
    # t=0: delta = 0.9*0.6 - 0.5 = 0.04         A0 = 0.04 + 0.72*0.4 = 0.328
    close(adv[1], [0.328, 0.4, 0.0, 0.0])
    close(ret[1], [0.828, 1.0, 0.0, 0.0])
    # row 2: the masked token in the middle is skipped, so token 2 follows token 0: r = [0, 1], V = [0.5, 0.7]
    # t=2: delta = 1 - 0.7 = 0.3                A2 = 0.3
    # t=0: delta = 0.9*0.7 - 0.5 = 0.13         A0 = 0.13 + 0.72*0.3 = 0.346
    close(adv[2], [0.346, 0.0, 0.3, 0.0])


def test_gae_with_gamma_lam_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t
    r, v = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.25, 1.0]])
    adv, ret = gae(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    close(adv, [[6 - 0.5, 5 - 0.25, 3 - 1.0]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_whiten_by_hand():
    x, mask = torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    # valid [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    close(whiten(x, mask), [[-1.0, 0.0], [1.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0], [3.0, 0.0]])


# four tokens, eps = 0.2, and one masked token with absurd values:
#   A=+1, r=1.5: -A r = -1.5, -A clip(r) = -1.2 -> max -1.2 (clipped)
#   A=+1, r=0.5: -0.5 vs -0.8                   -> -0.5      (unclipped: no floor on A>0 going down)
#   A=-1, r=0.5:  0.5 vs  0.8                   ->  0.8      (clipped)
#   A=-1, r=1.5:  1.5 vs  1.2                   ->  1.5      (unclipped: no cap on A<0 going up)
# loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15; clip fraction 2/4
RATIOS = torch.tensor([[1.5, 0.5, 0.5, 1.5, 50.0]])
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
MASK5 = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)


def test_ppo_policy_loss_clipping_both_sides():
    logp = RATIOS.log().clone().requires_grad_(True)
    out = ppo_policy_loss(logp, torch.zeros(1, 5), ADV, MASK5, clip_eps=0.2)
    close(out.loss, 0.15)
    close(out.clip_fraction, 0.5)
    # approx KL: 0.5 * mean of squared log ratios = 0.5 * (2 ln(1.5)^2 + 2 ln(2)^2) / 4
    close(out.approx_kl, 0.5 * (math.log(1.5) ** 2 + LN2**2) / 2)
    close(out.ratio_mean, 1.0)
    out.loss.backward()
    # clipped tokens get no gradient; unclipped: d(-A r)/dlogp = -A r, over 4 tokens
    close(logp.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]])


def test_ppo_value_loss_by_hand():
    # V_old = 0, eps = 0.2, so clip(V) lies in [-0.2, 0.2]:
    #   V=0.5,  R=1: (0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64 -> 0.64 (clipped is larger)
    #   V=0.5,  R=0: 0.25 vs (0.2-0)^2 = 0.04           -> 0.25
    #   V=-0.1, R=1: inside the clip range: 1.21 both   -> 1.21
    # loss = 0.5 * (0.64 + 0.25 + 1.21) / 3 = 0.35; clip fraction 1/3
    values = torch.tensor([[0.5, 0.5, -0.1, 42.0]])
    returns = torch.tensor([[1.0, 0.0, 1.0, -42.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    out = ppo_value_loss(values, torch.zeros(1, 4), returns, mask, clip_eps=0.2)
    close(out.loss, 0.35)
    close(out.clip_fraction, 1 / 3)


def test_explained_variance_by_hand():
    R, mask = torch.tensor([1.0, 2.0, 3.0, 50.0]), torch.tensor([True, True, True, False])
    close(explained_variance(torch.tensor([1.0, 2.0, 3.0, 0.0]), R, mask), 1.0)  # perfect
    close(explained_variance(torch.tensor([2.0, 2.0, 2.0, 0.0]), R, mask), 0.0)  # the mean
    # V = [1, 2, 4]: residual [0, 0, -1], var 2/9; var R = 2/3 -> 1 - 1/3 = 2/3
    close(explained_variance(torch.tensor([1.0, 2.0, 4.0, 0.0]), R, mask), 2 / 3)
    assert explained_variance(R, torch.ones(4), mask).isnan()


def test_kl_controllers_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to 0.2; coef *= 1 + 0.2 * 256 / 10000 = 1.00512
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    # KL 5.4: error -0.1; coef *= 1 - 0.1 * 256 / 10000 = 0.99744
    assert ctl.update(5.4, 256) == pytest.approx(0.1 * 1.00512 * 0.99744)
    # KL 0: error -1 clipped to -0.2
    assert ctl.update(0.0, 10000) == pytest.approx(0.1 * 1.00512 * 0.99744 * 0.8)
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


# ------------------------------------------------------------------------------------------------ GRPO


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 0: mean 0.5, deviations +-0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1 all equal -> 0
    s = math.sqrt(1 / 3) + 1e-4
    close(group_advantages(rewards, 4), [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    # batch std: mean 0.75, squared deviations 2 * 0.5625 + 6 * 0.0625 = 1.5, unbiased var 1.5 / 7
    b = math.sqrt(1.5 / 7) + 1e-4
    close(group_advantages(rewards, 4, scale="batch"), [0.5 / b, -0.5 / b, -0.5 / b, 0.5 / b, 0, 0, 0, 0])
    close(group_advantages(rewards, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # [N, G] in, [N, G] out
    assert group_advantages(rewards.view(2, 4), 4).shape == (2, 4)
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_group_advantages_constant_group_is_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    for scale in ("group", "batch", "none"):
        assert (group_advantages(rewards, 3, scale=scale) == 0).all()


# ragged batch: reply 0 has 3 tokens, reply 1 has 1; ratio 1 everywhere, no KL, A = [1, -2], so per-token loss is
# -A: reply 0 [-1, -1, -1], reply 1 [2] (its padding holds junk that must not count)
RAGGED = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
A2 = torch.tensor([1.0, -2.0])


@pytest.mark.parametrize(
    "aggregation, max_length, expected_loss, expected_grad",
    [
        # grpo: reply means -1 and 2, then their mean 0.5; token weights 1/(3*2) and 1/(1*2)
        ("grpo", None, 0.5, [[-1 / 6] * 3, [1.0, 0, 0]]),
        # dapo: sum (-3 + 2) / 4 tokens = -0.25; every token weighs 1/4
        ("dapo", None, -0.25, [[-1 / 4] * 3, [2 / 4, 0, 0]]),
        # dr_grpo: sum -1 / (2 replies x 3) = -1/6; every token weighs 1/6
        ("dr_grpo", None, -1 / 6, [[-1 / 6] * 3, [2 / 6, 0, 0]]),
        # dr_grpo with max_length 4: -1 / 8
        ("dr_grpo", 4, -1 / 8, [[-1 / 8] * 3, [2 / 8, 0, 0]]),
    ],
)
def test_grpo_aggregations_on_ragged_mask(aggregation, max_length, expected_loss, expected_grad):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 30.0, 30.0]], requires_grad=True)
    out = grpo_loss(logp, None, None, A2, RAGGED, aggregation=aggregation, max_length=max_length)
    close(out.loss, expected_loss)
    out.loss.backward()
    # d(-A ratio)/dlogp = -A ratio = -A at ratio 1, times the token's weight
    close(logp.grad, expected_grad)
    close(out.clip_ratio, 0.0)
    close(out.kl, 0.0)


def test_grpo_clip_higher_both_sides():
    # eps_low 0.2, eps_high 0.28 (DAPO's clip-higher); logp_old = 0 so ratio = exp(logp):
    #   r=1.3,  A=+1: min(1.3, 1.28) = 1.28  -> -1.28 (high clip)
    #   r=1.25, A=+1: inside the range       -> -1.25
    #   r=0.7,  A=-1: min(-0.7, -0.8) = -0.8 ->  0.8  (low clip)
    #   r=0.7,  A=+1: min(0.7, 0.8) = 0.7    -> -0.7  (no floor for A > 0)
    # one reply per token so advantages vary; grpo aggregation = mean of the four = (-1.28 - 1.25 + 0.8 - 0.7) / 4
    ratios = torch.tensor([[1.3], [1.25], [0.7], [0.7]])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    out = grpo_loss(ratios.log(), torch.zeros(4, 1), None, adv, torch.ones(4, 1, dtype=torch.bool), 0.2, 0.28)
    close(out.loss, (-1.28 - 1.25 + 0.8 - 0.7) / 4)
    close(out.clip_ratio_high, 0.25)
    close(out.clip_ratio_low, 0.25)
    close(out.clip_ratio, 0.5)


def test_grpo_kl_penalty_by_hand():
    # logp = ln 0.5, ref = ln 0.25 on both tokens: k3 = 0.5 + ln 2 - 1 each; A = 0 so only beta * k3 remains
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    k3 = 0.5 + LN2 - 1
    out = grpo_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), beta=0.1)
    close(out.loss, 0.1 * k3)
    close(out.kl, k3)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, None, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), beta=0.1)


def test_penalize_missing_eos_subtract_and_replace():
    from stagelm.losses import penalize_missing_eos

    score = torch.tensor([1.0, 0.5, -0.2])
    finished = torch.tensor([True, False, False])
    # subtract: unfinished replies lose 1.0: 0.5 - 1 = -0.5, -0.2 - 1 = -1.2; the finished one keeps 1.0
    assert torch.allclose(penalize_missing_eos(score, finished, 1.0, "subtract"), torch.tensor([1.0, -0.5, -1.2]))
    # replace: unfinished replies get -penalty whatever they scored
    assert torch.allclose(penalize_missing_eos(score, finished, 1.0, "replace"), torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="missing-EOS mode"):
        penalize_missing_eos(score, finished, 1.0, "zero")


def test_token_kl_by_hand():
    from stagelm.losses import token_kl

    # position 0: p = (1/2, 1/2), q = softmax(ln 3, 0) = (3/4, 1/4):
    #   KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    # position 1: identical distributions -> 0; position 2: masked out -> 0
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [5.0, 0.0]]])
    ref = torch.tensor([[[LN3, 0.0], [1.0, 2.0], [0.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    kl = token_kl(logits, ref, mask)
    assert torch.allclose(kl, torch.tensor([[0.5 * math.log(4 / 3), 0.0, 0.0]]), atol=1e-6)
    assert (token_kl(ref, logits) >= 0).all()
