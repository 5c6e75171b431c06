"""The reward model's scoring pieces that need no checkpoint (loading and scoring: tests/integration/
test_preference_stages.py)."""

from __future__ import annotations

import torch

from stagelm.reward_model import RewardHead, reply_positions


def test_reply_positions_follow_the_last_assistant_token() -> None:
    A, P = 6, 2  # <|assistant|>, <|pad|>
    ids = torch.tensor([[1, 5, 9, A, 7, 8, P], [P, P, 5, A, 7, A, 8], [1, 5, 9, 9, P, P, P]])
    mask = ids != P
    expected = [
        [False, False, False, False, True, True, False],
        [False, False, False, False, False, False, True],
        [True, True, True, True, False, False, False],  # no assistant turn: the whole text is scored
    ]
    assert reply_positions(ids, mask, A).tolist() == expected


def test_reward_head_keeps_lm_coef_in_its_state() -> None:
    assert set(RewardHead(8).state_dict()) == {"proj.weight", "proj.bias"}
    head = RewardHead(8, lm_coef=0.5)
    assert set(head.state_dict()) == {"proj.weight", "proj.bias", "lm_coef"} and float(head.lm_coef) == 0.5
    assert not any(p is head.lm_coef for p in head.parameters())  # a fixed coefficient, not trained
