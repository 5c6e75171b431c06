"""Answering held-out chat prompts by generation, and the checks every stage reports on the replies:
is the final answer right (`exact_match`), is the reply well formed (`format_ok`); per conversation and per task
family, as SFT's validation and the report's scorecard count them."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from stagelm.chat import Message, parse_assistant, render
from stagelm.model import Transformer
from stagelm.rollout import generate_rollout
from stagelm.tokenizer import SPECIAL_TOKENS, Tokenizer

if TYPE_CHECKING:
    from stagelm.data.instruct import Conversation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in digits (thousands commas dropped), or None: how a final answer is read."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


@torch.no_grad()
def generate_replies(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[list[Message]],
    tools: Sequence[list[dict[str, Any]] | None] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    greedy: bool = True,
    **sampling: Any,
) -> list[str]:
    """Assistant replies to chat prompts, as text ending with `<|end|>` when the model finished its turn
    (`sampling`: temperature, top_p, generator, as `generate_rollout` takes them)."""
    was_training = model.training
    model.eval()
    tools = tools or [None] * len(prompts)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        # keep the end of over-long prompts, so prompt + reply always fit the context
        keep = model.config.max_seq_len - max_new_tokens
        ids = [
            tokenizer.encode(render(p, add_generation_prompt=True, tools=t))[-keep:]
            for p, t in zip(prompts[start : start + batch_size], tools[start : start + batch_size])
        ]
        replies += generate_rollout(model, tokenizer, ids, max_new_tokens, greedy=greedy, **sampling).replies
    model.train(was_training)
    return replies


def win_score(score: float, baseline: float, tolerance: float = 1e-9) -> float:
    """One comparison of a reply with the baseline's reply to the same prompt: 1 a win, 0.5 a tie (within
    `tolerance`, so float noise in a judge's score is no win), 0 a loss. A win rate is its mean."""
    if abs(score - baseline) <= tolerance:
        return 0.5
    return 1.0 if score > baseline else 0.0


def format_ok(reply: str) -> bool:
    """Well formed: the turn ended with `<|end|>`, has content or valid tool calls, and no stray special tokens."""
    message = parse_assistant(reply)
    if message.get("finished") is False or message.get("malformed_tool_call"):
        return False
    content = message.get("content", "")
    if any(tok in content for tok in SPECIAL_TOKENS):
        return False
    return bool(content.strip() or message.get("tool_calls"))


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s,-]", " ", text.lower()).split()).strip(" ,")


def answer_correct(reply: str, answer: str | None, reference: str) -> bool:
    """A numeric answer must equal the reply's last number; a text answer ("seventy-one", "3, 4, 5") must end
    the reply; with no answer the whole reply must equal the reference (whitespace aside)."""
    content = parse_assistant(reply).get("content", "")
    if answer is None:
        return " ".join(content.split()) == " ".join(reference.split())
    expected = last_number(str(answer))
    if expected is not None and _normalise(str(answer)) == _normalise(expected):
        return last_number(content) == expected
    target = _normalise(str(answer))
    return bool(target) and _normalise(content).endswith(target)


def answer_conversations(
    model: Transformer,
    tokenizer: Tokenizer,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> tuple[list[str], list[bool]]:
    """Greedy replies to held-out conversations' prompts (their tools given), and whether each final answer is
    right: SFT's `val/exact_match` per conversation, and the report's scorecard for every chat stage."""
    replies = generate_replies(
        model,
        tokenizer,
        [c.prompt for c in conversations],
        [c.tools for c in conversations],
        max_new_tokens,
        batch_size,
    )
    return replies, [answer_correct(r, c.answer, c.reference) for r, c in zip(replies, conversations)]


def by_family(families: Sequence[str | None], values: Sequence[float]) -> dict[str, list[float]]:
    """Per-item values grouped by task family, in the items' order (items with no family are left out)."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for family, value in zip(families, values):
        if family:
            grouped[family].append(float(value))
    return dict(grouped)
