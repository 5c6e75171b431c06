"""How a chat model behaves in conversations, measured on held-out built-in conversations (SFT validation):

- `val/tool_decision`: at the last user turn, the reply calls a tool exactly when the world says the turn needs
  one, and answers directly otherwise (an attempted, malformed call counts as a call);
- `val/tool_args_exact`: of the turns that need tools, the calls are exactly the needed ones (names and JSON
  arguments, in order; two questions in one message need two calls in one reply);
- `val/tool_result_used`: with the right calls and their results in context, the final reply carries every result
  exactly (a number as that whole number, an error's text as written: an honest reply says what went wrong);
- `val/exact_match_turn2plus`: exact match on last turns after the first of their conversation, and
  `val/exact_match_turn2plus_alone` on the same questions asked alone (same system prompt and tools), so
  the cost of the conversation around a question is visible.

Only conversations that say what they need (`Conversation.needed_calls`, the built-in data) are counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from stagelm.chat import Message, parse_assistant
from stagelm.data.instruct import Conversation
from stagelm.evaluation import answer_correct, generate_replies
from stagelm.model import Transformer
from stagelm.tokenizer import Tokenizer

# room for two calls in one reply (each call is about 60 characters, one token a character)
CALLS_MAX_NEW_TOKENS = 160


def decision_prompt(conversation: Conversation) -> list[Message]:
    """The conversation up to and including its last user message: where the model decides to call or answer."""
    last_user = max(i for i, m in enumerate(conversation.messages) if m["role"] == "user")
    return conversation.messages[: last_user + 1]


def tool_calls_of(reply: str) -> list[tuple[str, Any]] | None:
    """The (name, parsed arguments) of each call in a generated reply; [] for no call, None for a malformed one."""
    message = parse_assistant(reply)
    if message.get("malformed_tool_call"):
        return None
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


def carries_result(content: str, result: str) -> bool:
    """The reply states the tool's result exactly: a number as that whole number (not a longer one containing
    it), anything else (an error's text, without its "error: " prefix) verbatim."""
    text = result.removeprefix("error: ").strip()
    if re.fullmatch(r"-?\d+", text):
        return re.search(rf"(?<![\d,]){re.escape(text)}(?![\d,])", content) is not None
    return text in content


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)


def chat_behaviour_metrics(
    model: Transformer,
    tokenizer: Tokenizer,
    conversations: Sequence[Conversation],
    replies: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> dict[str, float]:
    """The metrics above; ``replies`` are the greedy replies to each conversation's ``prompt`` (everything before
    its final assistant turn), as SFT validation already generates them. Metrics with nothing to count are left
    out."""
    known = [i for i, c in enumerate(conversations) if c.needed_calls is not None]
    needing = [i for i in known if conversations[i].needed_calls]
    decided = generate_replies(
        model,
        tokenizer,
        [decision_prompt(conversations[i]) for i in needing],
        [conversations[i].tools for i in needing],
        max(max_new_tokens, CALLS_MAX_NEW_TOKENS),
        batch_size,
    )
    calls_at = dict(zip(needing, (tool_calls_of(r) for r in decided)))
    decision, args_exact, result_used = [], [], []
    for i in known:
        conv = conversations[i]
        if conv.needed_calls:
            calls = calls_at[i]
            decision.append(calls is None or bool(calls))
            expected = [(c["name"], c["arguments"]) for c in conv.needed_calls]
            args_exact.append(calls == expected)
            results = [m["content"] for m in conv.prompt[len(decision_prompt(conv)) :] if m["role"] == "tool"]
            content = parse_assistant(replies[i]).get("content", "")
            result_used.append(all(carries_result(content, r) for r in results))
        else:
            decision.append(tool_calls_of(replies[i]) == [])
    metrics: dict[str, float] = {}
    if decision:
        metrics["val/tool_decision"] = _rate(decision)
    if args_exact:
        metrics["val/tool_args_exact"] = _rate(args_exact)
        metrics["val/tool_result_used"] = _rate(result_used)

    later = [i for i, c in enumerate(conversations) if c.turns > 1 and c.standalone]
    if later:
        alone = [
            Conversation(conversations[i].standalone, conversations[i].tools, conversations[i].answer) for i in later
        ]
        alone_replies = generate_replies(
            model, tokenizer, [c.prompt for c in alone], [c.tools for c in alone], max_new_tokens, batch_size
        )
        in_conversation = [
            answer_correct(replies[i], conversations[i].answer, conversations[i].reference) for i in later
        ]
        asked_alone = [answer_correct(r, c.answer, c.reference) for r, c in zip(alone_replies, alone)]
        metrics["val/exact_match_turn2plus"] = _rate(in_conversation)
        metrics["val/exact_match_turn2plus_alone"] = _rate(asked_alone)
    return metrics
