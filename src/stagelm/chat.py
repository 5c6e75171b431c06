"""The chat format, defined once: messages <-> text with the tokenizer's reserved special tokens.

A conversation renders as

    <|bos|><|system|>You are helpful.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>2 + 3 = 5.<|end|>

Assistant turns may carry OpenAI-shaped `tool_calls`; each is written between the tool-call delimiters as
`<id> <name> <arguments>`, the arguments being the call's JSON string verbatim (so rendering then parsing gives
back exactly the same message), and a `tool` turn carries `<tool_call_id> <result>`:

    <|assistant|><|tool_call|>call_0 calculator {"expression": "4821 * 37"}<|/tool_call|><|end|>
    <|tool|>call_0 178377<|end|><|assistant|>4821 * 37 = 178377.<|end|>

Only assistant turns are trained on (`render_for_training` returns the loss mask); a model's reply is read back
with `parse_assistant`, which never raises: malformed tool-call JSON comes back as plain content with a flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stagelm.tokenizer import ASSISTANT, BOS, END_OF_TURN, SYSTEM, TOOL, TOOL_CALL_END, TOOL_CALL_START, USER, Tokenizer

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}
Message = dict[str, Any]


class ChatFormatError(ValueError):
    """A message list that cannot be rendered (unknown role, missing field); the message says which turn."""


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """A compact system-prompt line per tool: `name(arg, ...): description`."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"tools must be a list of tool descriptions, found {type(tools).__name__}")
    lines = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        params = fn.get("parameters") if isinstance(fn, dict) else None
        properties = params.get("properties", {}) if isinstance(params, dict) else {}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(properties, dict):
            raise ChatFormatError(
                f"tool {i}: expected {{'function': {{'name': ..., 'parameters': {{'properties': {{...}}}}}}}}"
            )
        lines.append(f"{fn['name']}({', '.join(map(str, properties))}): {fn.get('description', '')}".rstrip(": "))
    return "Tools you can call:\n" + "\n".join(lines)


def _render_tool_call(call: dict[str, Any], where: str) -> str:
    try:
        fn = call["function"]
        call_id, name, arguments = call["id"], fn["name"], fn["arguments"]
    except (KeyError, TypeError, IndexError):
        raise ChatFormatError(f"{where}: a tool call needs 'id' and 'function' with 'name' and 'arguments'") from None
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise ChatFormatError(f"{where}: tool call id and name must be strings")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    if any(c.isspace() for c in call_id + name) or not call_id or not name:
        raise ChatFormatError(f"{where}: tool call id and name must be non-empty and contain no spaces")
    return f"{TOOL_CALL_START}{call_id} {name} {arguments}{TOOL_CALL_END}"


def render_turn(message: Message, index: int = 0) -> str:
    """One message as text, ending with the end-of-turn token."""
    where = f"message {index}"
    if not isinstance(message, dict):
        raise ChatFormatError(f"{where}: a message must be an object with 'role' and 'content'")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLE_TOKENS:
        raise ChatFormatError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLE_TOKENS)})")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise ChatFormatError(f"{where}: content must be a string")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not call_id or not isinstance(call_id, str):
            raise ChatFormatError(f"{where}: a tool message needs a string 'tool_call_id'")
        return f"{TOOL}{call_id} {content}{END_OF_TURN}"
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise ChatFormatError(f"{where}: 'tool_calls' must be a list")
    calls = "".join(_render_tool_call(c, where) for c in tool_calls)
    return f"{ROLE_TOKENS[role]}{content}{calls}{END_OF_TURN}"


def with_tools(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """Tools are described in the system turn (prepended, or appended to an existing one)."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"a conversation must be a list of messages, found {type(messages).__name__}")
    if not tools:
        return list(messages)
    description = describe_tools(tools)
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = messages[0].get("content") or ""
        if not isinstance(system, str):
            raise ChatFormatError("message 0: content must be a string")
        first = dict(messages[0], content=f"{system}\n{description}".lstrip("\n"))
        return [first, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]


def render(messages: list[Message], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The whole conversation as text; with add_generation_prompt, ends with `<|assistant|>` for the reply."""
    text = BOS + "".join(render_turn(m, i) for i, m in enumerate(with_tools(messages, tools)))
    return text + (ASSISTANT if add_generation_prompt else "")


@dataclass
class RenderedExample:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is predicted with loss (assistant replies and their end token)


def render_for_training(
    tokenizer: Tokenizer, messages: list[Message], tools: list[dict] | None = None
) -> RenderedExample:
    """Token ids and loss mask: only what the assistant says (content, tool calls, `<|end|>`) carries loss;
    the `<|assistant|>` role token itself is prompt, since generation starts after it."""
    ids, mask = [tokenizer.bos_id], [False]
    for i, message in enumerate(with_tools(messages, tools)):
        turn = tokenizer.encode(render_turn(message, i))
        ids.extend(turn)
        if message["role"] == "assistant":
            mask.extend([False] + [True] * (len(turn) - 1))
        else:
            mask.extend([False] * len(turn))
    return RenderedExample(ids, mask)


def parse_assistant(text: str) -> Message:
    """A generated reply (the text after `<|assistant|>`) -> an assistant message. Never raises.

    Text after the first `<|end|>` is ignored. Tool calls are parsed from their delimiters; if any is malformed
    (bad delimiters, missing fields, arguments that are not JSON) the whole reply is returned as plain content
    with `"malformed_tool_call": True`."""
    finished = END_OF_TURN in text
    body = text.split(END_OF_TURN, 1)[0]
    message: Message = {"role": "assistant", "content": body}
    if TOOL_CALL_START not in body and TOOL_CALL_END not in body:
        return message if finished else {**message, "finished": False}
    content, _, rest = body.partition(TOOL_CALL_START)
    calls, chunks = [], (TOOL_CALL_START + rest).split(TOOL_CALL_START)[1:]
    for chunk in chunks:
        inner, sep, trailing = chunk.partition(TOOL_CALL_END)
        parts = inner.split(" ", 2)
        if not sep or trailing.strip() or len(parts) != 3:
            return {**message, "malformed_tool_call": True}
        call_id, name, arguments = parts
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            return {**message, "malformed_tool_call": True}
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    return message if finished else {**message, "finished": False}


def parse(text: str) -> list[Message]:
    """A rendered conversation back to messages (the inverse of `render` without tools)."""
    if text.startswith(BOS):
        text = text[len(BOS) :]
    roles = {token: role for role, token in ROLE_TOKENS.items()}
    messages: list[Message] = []
    while text:
        token = next((t for t in roles if text.startswith(t)), None)
        if token is None:
            raise ChatFormatError(f"expected a role token at {text[:30]!r}")
        body, sep, text = text[len(token) :].partition(END_OF_TURN)
        if not sep:
            raise ChatFormatError(f"turn {len(messages)} has no {END_OF_TURN}")
        role = roles[token]
        if role == "assistant":
            messages.append(parse_assistant(body + END_OF_TURN))
        elif role == "tool":
            call_id, _, content = body.partition(" ")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        else:
            messages.append({"role": role, "content": body})
    return messages
