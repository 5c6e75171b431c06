"""Using a trained reward model (`stagelm-train stage=reward`): load it from its checkpoint and score replies.

    from stagelm.reward_model import RewardModel
    rm = RewardModel.load("outputs/.../checkpoints/best.ckpt")
    rm.score(["What is 2 + 3?"], ["2 + 3 = 5."])                      # -> [1.73]
    rm.score_conversations([[{"role": "user", ...}, {"role": "assistant", ...}]])
    rm(input_ids, attention_mask)                                      # -> scores [B], e.g. on PPO rollouts

The score of a conversation is the scalar head read at its last real token (the reply's `<|end|>`), exactly as in
training; `forward` takes any padding (left, as the sampler writes rollouts, or right) because the backbone places
tokens by `attention_mask`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stagelm.chat import Message, render
from stagelm.checkpoint import load_checkpoint, load_weights_strict, read_checkpoint, submodule_state
from stagelm.errors import CheckpointError
from stagelm.generation import left_pad
from stagelm.losses import sequence_logprobs, sum_by_sequence
from stagelm.model import Transformer
from stagelm.model.heads import ScalarHead, gather_last, last_token_index
from stagelm.tokenizer import ASSISTANT, END_OF_TURN, Tokenizer

HEAD_PREFIX = "reward_head."  # where the reward stage saves its head in the checkpoint's state_dict


class RewardHead(ScalarHead):
    """The scalar head, optionally plus `lm_coef` x the reply's log-likelihood under the backbone's own LM head.

    A head read at the last token must re-derive, in the layers after the reply, facts the LM head already scores
    at every token (is "23 + 48 = 72" right?): a 4-layer model cannot compare its prediction at one position with
    the token at the next one and carry the result to the end. The log-likelihood term hands that comparison to
    the head for free, as DPO's implicit reward does (Rafailov et al. 2023); `lm_coef=None` is the plain head.
    """

    def __init__(self, d_model: int, init_std: float = 0.0, lm_coef: float | None = None) -> None:
        super().__init__(d_model, init_std)
        self.register_buffer("lm_coef", None if lm_coef is None else torch.tensor(float(lm_coef)))


def reply_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, assistant_id: int) -> torch.Tensor:
    """[B, T] bool: the real tokens after each row's last `<|assistant|>` (the reply being scored, `<|end|>` included).
    Derived from the ids alone, so it holds for any padding and needs no prompt lengths."""
    mask = attention_mask.bool()
    start = last_token_index((input_ids == assistant_id) & mask)  # [B], -1 when there is none: all tokens count
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions[None] > start[:, None]) & mask


def last_token_scores(
    backbone: nn.Module,
    head: RewardHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    assistant_id: int,
    pass_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B]: the head read at each row's last real token [+ lm_coef x the reply's log-likelihood], the
    backbone's MoE aux loss).

    pass_mask=False runs the plain causal fast path, which is exact only for right-padded rows (the reward stage's
    batches): real tokens never attend to the padding after them and positions count from 0 anyway."""
    use_lm = head.lm_coef is not None
    out = backbone(
        input_ids, attention_mask=attention_mask if pass_mask else None, return_hidden=True, compute_logits=use_lm
    )
    scores = gather_last(head(out.hidden), attention_mask)
    if use_lm:
        reply = reply_positions(input_ids, attention_mask, assistant_id)[:, 1:]  # tokens predicted at t - 1
        logp = sequence_logprobs(out.logits[:, :-1], input_ids[:, 1:], reply)
        scores = scores + head.lm_coef * sum_by_sequence(logp, reply)
    return scores, out.aux_loss


class RewardModel(nn.Module):
    """A backbone and a scalar head that score a conversation's final reply; higher is preferred."""

    def __init__(self, backbone: Transformer, head: RewardHead, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.backbone, self.head, self.tokenizer = backbone, head, tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> RewardModel:
        """The reward model saved by `stagelm-train stage=reward`, in eval mode; CheckpointError for any other."""
        stage = read_checkpoint(path, map_location)["stagelm"].get("stage", "unknown")
        if stage != "reward":
            raise CheckpointError(f"{path} is not a reward model: expected stage 'reward', found '{stage}'")
        loaded = load_checkpoint(path, map_location)
        state = submodule_state(loaded.state_dict, HEAD_PREFIX)
        head = RewardHead(loaded.model_config.d_model, lm_coef=float(state["lm_coef"]) if "lm_coef" in state else None)
        load_weights_strict(head, state, str(path))
        return cls(loaded.model, head, loaded.tokenizer).eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask [B, T] (any padding) -> scores [B] at each row's last real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        assistant_id = self.tokenizer.token_id(ASSISTANT)
        return last_token_scores(self.backbone, self.head, input_ids, attention_mask, assistant_id)[0]

    @torch.no_grad()
    def score_conversations(
        self,
        conversations: Sequence[list[Message]],
        tools: Sequence[list[dict] | None] | None = None,
        batch_size: int = 64,
    ) -> list[float]:
        """The score of each conversation's last turn (normally an assistant reply)."""
        tools = tools or [None] * len(conversations)
        limit = self.backbone.config.max_seq_len
        # too long: keep the end, where the reply being scored is
        ids = [self.tokenizer.encode(render(list(c), tools=t))[-limit:] for c, t in zip(conversations, tools)]
        scores: list[float] = []
        for start in range(0, len(ids), batch_size):
            input_ids, mask = left_pad(ids[start : start + batch_size], self.tokenizer.pad_id, self.device)
            scores.extend(self(input_ids, mask).tolist())
        return scores

    def score(
        self,
        prompts: Sequence[str | list[Message]],
        replies: Sequence[str],
        tools: Sequence[list[dict] | None] | None = None,
        batch_size: int = 64,
    ) -> list[float]:
        """Scores of replies (text, a trailing `<|end|>` allowed) to prompts (a user message, or messages)."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        conversations = [
            ([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
            + [{"role": "assistant", "content": r.removesuffix(END_OF_TURN)}]
            for p, r in zip(prompts, replies)
        ]
        return self.score_conversations(conversations, tools, batch_size)
