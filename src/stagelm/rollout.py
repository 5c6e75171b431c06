"""Rollouts for the RL stages (PPO, GRPO): sample replies to chat prompts with the KV-cache sampler, then
recompute their log-probabilities with one training forward pass.

The layout is the sampler's: prompts left-padded to width P, completions of width N after them, so
`logits[:, P-1 : P+N-1]` of a forward pass over `input_ids` predict exactly the sampled tokens. With the same
temperature on both sides the recomputed log-probs equal the sampler's (up to float error): the updates are
on-policy, and the largest difference is worth logging every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stagelm.generation import generate
from stagelm.model import Transformer, TransformerOutput
from stagelm.tokenizer import Tokenizer


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + N] prompt (left-padded) then completion (pad after a stop)
    attention_mask: torch.Tensor  # [B, P + N] bool, real tokens
    completion_mask: torch.Tensor  # [B, N] bool, generated tokens up to and including the stop token
    logprobs: torch.Tensor  # [B, N] the sampler's log-probs of its tokens (temperature applied)
    finished: torch.Tensor  # [B] bool, the reply ended with a stop token
    prompt_width: int  # P
    replies: list[str]  # decoded replies, ending with <|end|> when finished
    seconds: float = 0.0  # wall time the sampler took

    @property
    def tokens_per_sec(self) -> float:
        """Generated tokens (stop tokens included) per second of sampling, over all rows."""
        return float(self.completion_mask.sum()) / max(self.seconds, 1e-9)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@torch.no_grad()
def generate_rollout(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """One reply to each already-rendered prompt (greedy, or sampled), stopping at the end of the assistant's turn:
    the one way every stage answers prompts (rollouts, validation, evaluation)."""
    started = time.perf_counter()
    out = generate(
        model,
        prompts,
        max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        stop_tokens=tokenizer.reply_stop_ids,
        pad_id=tokenizer.pad_id,
        generator=generator,
    )
    input_ids, attention_mask = out.sequences()
    replies = [tokenizer.decode(ids) for ids in out.completions()]
    seconds = time.perf_counter() - started
    P = out.prompt_ids.shape[1]
    return Rollout(input_ids, attention_mask, out.mask, out.logprobs, out.finished, P, replies, seconds)


@torch.no_grad()
def greedy_replies(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy replies to already-rendered prompts, ending with `<|end|>` when the model finished its turn."""
    return generate_rollout(model, tokenizer, prompt_ids, max_new_tokens, greedy=True).replies


@torch.no_grad()
def sample_rollouts(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """`samples_per_prompt` replies to each prompt; rows are prompt-major (prompt i owns rows i*G .. i*G+G-1)."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    return generate_rollout(model, tokenizer, repeated, max_new_tokens, False, temperature, top_p, generator)


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The given rows of a rollout, with the columns that are padding in every one of them dropped (leading prompt
    padding, trailing completion padding: the sampler pads to the longest prompt and to max_new_tokens). Positions
    count real tokens only, so the forward pass over what is left computes the same log-probs. Per-token tensors
    [B, N] of the whole rollout line up with the result as `[rows, :result.completion_mask.shape[1]]`."""
    prompt_mask = rollout.attention_mask[rows, : rollout.prompt_width]
    start = int(prompt_mask.any(0).nonzero()[0]) if prompt_mask.any() else 0
    width = max(int(rollout.completion_mask[rows].sum(1).max()), 1)
    end = rollout.prompt_width + width
    return Rollout(
        input_ids=rollout.input_ids[rows, start:end],
        attention_mask=rollout.attention_mask[rows, start:end],
        completion_mask=rollout.completion_mask[rows, :width],
        logprobs=rollout.logprobs[rows, :width],
        finished=rollout.finished[rows],
        prompt_width=rollout.prompt_width - start,
        replies=[rollout.replies[i] for i in rows.tolist()],
    )


def completion_logprobs(
    model: Transformer,
    rollout: Rollout,
    temperature: float = 1.0,
    return_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, TransformerOutput]:
    """Log-probs [B, N] and entropies [B, N] of the completion tokens under `model` (with gradients), plus the
    model output (its hidden states when asked, for value heads)."""
    out = model(rollout.input_ids, attention_mask=rollout.attention_mask, return_hidden=return_hidden)
    P, N = rollout.prompt_width, rollout.completion_mask.shape[1]
    logits = out.logits[:, P - 1 : P + N - 1].float() / temperature  # [B, N, V] predicting each completion token
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, N]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, N]
    mask = rollout.completion_mask
    return logprobs * mask, entropy * mask, out
