"""Rollouts: the training forward pass recomputes exactly the sampler's log-probs (so RL updates are on-policy)."""

from __future__ import annotations

import torch

from stagelm.chat import render
from stagelm.model import Transformer
from stagelm.rollout import completion_logprobs, sample_rollouts
from stagelm.tokenizer import CharTokenizer
from tests.conftest import tiny_model_config


def test_recomputed_logprobs_match_the_sampler() -> None:
    torch.manual_seed(0)
    tok = CharTokenizer.train(["0123456789 +-=?"])
    model = Transformer(tiny_model_config(vocab_size=tok.vocab_size, max_seq_len=256))
    prompts = [
        tok.encode(render([{"role": "user", "content": q}], add_generation_prompt=True))
        for q in ["1 + 2 = ?", "What is 37 - 5?", "9"]
    ]
    for temperature in (1.0, 0.7):
        rollout = sample_rollouts(
            model,
            tok,
            prompts,
            samples_per_prompt=4,
            max_new_tokens=12,
            temperature=temperature,
            generator=torch.Generator().manual_seed(1),
        )
        assert len(rollout) == 12 and rollout.completion_mask.shape == (12, 12)
        # prompt-major rows: the four samples of a prompt share its (left-padded) prompt
        assert torch.equal(rollout.input_ids[0, : rollout.prompt_width], rollout.input_ids[3, : rollout.prompt_width])
        logprobs, entropy, _ = completion_logprobs(model.train(), rollout, temperature=temperature)
        diff = (logprobs - rollout.logprobs).abs()[rollout.completion_mask]
        assert diff.max() < 1e-4, diff.max()
        assert (entropy[rollout.completion_mask] > 0).all()
        assert (logprobs[~rollout.completion_mask] == 0).all()
