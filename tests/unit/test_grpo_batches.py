"""The GRPO stage's micro-batches: leaving out zero-advantage replies and cutting the rest into prompt-length-sorted
micro-batches gives exactly the gradient of the whole batch's loss, and trimmed rows keep their log-probs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from stagelm.chat import render
from stagelm.losses import group_advantages, grpo_loss
from stagelm.rollout import completion_logprobs, sample_rollouts, select_rows
from stagelm.stages.grpo import GRPOModule
from stagelm.tokenizer import CharTokenizer
from tests.conftest import tiny_model_config

G = 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = CharTokenizer.train(["0123456789 +-=?. Whatisthe answer"])
    config = tiny_model_config(vocab_size=tok.vocab_size, top_k=1, max_seq_len=128)
    questions = ["1 + 2 = ?", "What is 37 - 5 + 12 - 3?", "9", "What is 4?", "12 - 7 = ?"]
    prompts = [tok.encode(render([{"role": "user", "content": q}], add_generation_prompt=True)) for q in questions]

    def module(**kwargs) -> GRPOModule:
        m = GRPOModule(config, tok, partial(torch.optim.SGD, lr=0.1), num_generations=G, **kwargs)
        m.model.load_state_dict(reference.state_dict())
        return m

    reference = GRPOModule(config, tok, partial(torch.optim.SGD, lr=0.1), num_generations=G).model
    rollout = sample_rollouts(reference, tok, prompts, G, 10, generator=torch.Generator().manual_seed(3))
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0.5, 0, 1, 0, 0, 0, 0, 0.1])  # groups 2, 3 constant
    return module, rollout, rewards


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_micro_batches_give_the_full_batch_gradient(setup, aggregation: str, micro_batch_size: int | None) -> None:
    module_factory, rollout, rewards = setup
    module = module_factory(loss_aggregation=aggregation, micro_batch_size=micro_batch_size, max_new_tokens=10)
    advantages = group_advantages(rewards, G, "group")
    model = module.model.train()

    logp, _, _ = completion_logprobs(model, rollout)
    full = grpo_loss(
        logp, rollout.logprobs, None, advantages, rollout.completion_mask, aggregation=aggregation, max_length=10
    ).loss
    full.backward()
    expected = _grads(model)

    chunks = module.micro_batches(rollout, advantages)
    assert sum(len(c.rollout) for c in chunks) == len(rewards) - 2 * G  # the two constant groups are left out
    if micro_batch_size:
        assert all(len(c.rollout) <= micro_batch_size for c in chunks) and len(chunks) > 1
    total = 0.0
    for chunk in chunks:
        logp, _, _ = completion_logprobs(model, chunk.rollout)
        loss = (
            grpo_loss(
                logp,
                chunk.rollout.logprobs,
                None,
                chunk.advantages,
                chunk.rollout.completion_mask,
                aggregation=aggregation,
                max_length=10,
            ).loss
            * chunk.weight
        )
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(full), abs=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-4)


def test_selected_rows_drop_padding_and_keep_their_logprobs(setup) -> None:
    _, rollout, _ = setup
    rows = torch.tensor([0, 2, 8])  # short prompts only: the long prompt's left padding goes
    sub = select_rows(rollout, rows)
    assert sub.input_ids.shape[1] < rollout.input_ids.shape[1] and sub.replies == [rollout.replies[i] for i in rows]
    assert sub.attention_mask[:, 0].any() and sub.completion_mask[:, -1].any()
    logp, _, _ = completion_logprobs(setup[0]().model, sub)
    assert ((logp - sub.logprobs).abs() * sub.completion_mask).max() < 1e-4
