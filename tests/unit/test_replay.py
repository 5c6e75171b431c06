"""SFT replay for the RL stages: batches fixed by (seed, step, index), labels only on the assistant's tokens, and a
loss that is SFT's cross-entropy on them."""

from __future__ import annotations

import pytest
import torch

from stagelm.data.instruct import IGNORE_INDEX
from stagelm.errors import ConfigError
from stagelm.model import Transformer
from stagelm.replay import SFTReplay
from stagelm.tokenizer import CharTokenizer
from tests.conftest import tiny_model_config


def test_replay_batches_are_fixed_by_step_and_mask_all_but_the_assistant() -> None:
    tokenizer = CharTokenizer.train(["abc"], include_ascii=True)
    replay = SFTReplay(tokenizer, coef=0.1, batch_size=4, builtin_examples=60, seed=3)
    assert replay.enabled and len(replay.examples) == 60
    a, b = replay.batch(step=5, index=1), replay.batch(step=5, index=1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(replay.batch(step=6)["input_ids"][:, :20], a["input_ids"][:, :20])
    for row in range(4):
        learned = tokenizer.decode(a["labels"][row][a["labels"][row] != IGNORE_INDEX].tolist())
        assert "<|end|>" in learned and "<|user|>" not in learned and "<|system|>" not in learned
    # the loss is the mean cross-entropy over exactly those labels
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size))
    logits = model(a["input_ids"]).logits
    keep = a["labels"] != IGNORE_INDEX
    by_hand = -torch.log_softmax(logits.float(), -1)[keep].gather(1, a["labels"][keep][:, None]).mean()
    assert torch.allclose(replay.loss(model, step=5, index=1), by_hand, atol=1e-5)
    off = SFTReplay(tokenizer, coef=0.0)
    assert not off.enabled and off.examples == []  # off: nothing built
    with pytest.raises(ConfigError, match=r"stage\.replay\.coef must be >= 0, found -1"):
        SFTReplay(tokenizer, coef=-1)
