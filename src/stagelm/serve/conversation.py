"""From API messages to the model's prompt, and from generated tokens back to an API reply.

Both APIs (OpenAI's and Ollama's) send a conversation as messages; `build_prompt` checks it, maps tool-call ids,
renders it in the chat format and says how decoding must be constrained for `tool_choice`. `ReplyAssembler`
turns the generated tokens into content text and tool calls, incrementally, for streamed and non-streamed
replies alike, so the two can never disagree.

Tool-call ids: the model was trained to number its calls `call_0, call_1, ...` in order of appearance, while API
clients expect ids unique within the conversation. Replies therefore carry fresh random ids, and when a
conversation comes back every assistant tool call is renumbered in order of appearance before rendering, and each
`tool` message is mapped to the call it answers (by `tool_call_id`, or, for Ollama's messages that carry no ids,
to the oldest unanswered call).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stagelm.chat import ChatFormatError, parse_assistant, render
from stagelm.tokenizer import (
    ASSISTANT,
    BOS,
    END_OF_TURN,
    EOS,
    SYSTEM,
    TOOL,
    TOOL_CALL_END,
    TOOL_CALL_START,
    USER,
    Tokenizer,
)

# A reply ends at the end-of-turn token; EOS or a role token would also mean the turn is over.
STOP_TOKENS = (END_OF_TURN, EOS, BOS, SYSTEM, USER, ASSISTANT, TOOL)
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(ValueError):
    """An invalid request (HTTP 400); param names the offending field, code is OpenAI's error code if any."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class Prompt:
    """What the engine needs for one chat request."""

    ids: list[int]
    forced_prefix: tuple[int, ...] = ()
    banned_token_ids: tuple[int, ...] = ()
    tool_names: tuple[str, ...] = ()


def _text_of(content: Any, where: str) -> str:
    """OpenAI content: a string, null, or a list of parts of which only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}: content must be a string or a list of text parts", where)


def _arguments_text(arguments: Any, where: str) -> str:
    """Arguments as the JSON string the model reads: OpenAI sends a string, Ollama an object."""
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, dict):
        return json.dumps(arguments)
    raise RequestError(f"{where}: function.arguments must be a JSON string or an object", where)


def normalise_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """API messages -> chat-format messages with tool-call ids renumbered; RequestError says what is wrong."""
    if not messages:
        raise RequestError("messages must contain at least one message", "messages")
    out: list[dict[str, Any]] = []
    model_id_of: dict[str, str] = {}  # client's id -> id the model sees
    unanswered: list[str] = []  # model ids of calls with no tool message yet, oldest first
    n_calls = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{where}.role")
        content = _text_of(message.get("content"), f"{where}.content")
        if role in ("system", "developer", "user"):
            out.append({"role": "system" if role == "developer" else role, "content": content})
        elif role == "assistant":
            calls = []
            for j, call in enumerate(message.get("tool_calls") or []):
                cwhere = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise RequestError(f"{cwhere}: a tool call needs function.name", cwhere)
                if any(c.isspace() for c in fn["name"]):
                    raise RequestError(f"{cwhere}: function.name must not contain spaces", cwhere)
                model_id = f"call_{n_calls}"
                n_calls += 1
                if call.get("id"):
                    model_id_of[str(call["id"])] = model_id
                unanswered.append(model_id)
                arguments = _arguments_text(fn.get("arguments", "{}"), f"{cwhere}.function.arguments")
                calls.append(
                    {"id": model_id, "type": "function", "function": {"name": fn["name"], "arguments": arguments}}
                )
            turn: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
        else:  # tool
            client_id = message.get("tool_call_id")
            if client_id:
                if str(client_id) not in model_id_of:
                    raise RequestError(
                        f"{where}: tool_call_id {client_id!r} does not match any earlier assistant tool call",
                        f"{where}.tool_call_id",
                    )
                model_id = model_id_of[str(client_id)]
            elif unanswered:
                model_id = unanswered[0]
            else:
                raise RequestError(f"{where}: a tool message must answer an earlier assistant tool call", where)
            if model_id in unanswered:
                unanswered.remove(model_id)
            out.append({"role": "tool", "tool_call_id": model_id, "content": content})
    return out


def _tool_name(tool: dict[str, Any], where: str) -> str:
    fn = tool.get("function") if isinstance(tool, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise RequestError(f"{where}: a tool needs function.name without spaces", where)
    return name


def build_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
) -> Prompt:
    """Check and render a chat request; constrain decoding for tool_choice.

    tool_choice: "none" forbids the tool-call token; "required" forces the reply to open with one; a named
    function (`{"type": "function", "function": {"name": ...}}`) forces a call to it, id and name included;
    "auto" (the default with tools) leaves it to the model. Without tools the model may not call any."""
    chat_messages = normalise_messages(messages)
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools must be a list", "tools")
    tools = list(tools or [])
    names = tuple(_tool_name(t, f"tools[{i}]") for i, t in enumerate(tools))
    call_start, call_end = tokenizer.token_id(TOOL_CALL_START), tokenizer.token_id(TOOL_CALL_END)
    forced: tuple[int, ...] = ()
    banned: tuple[int, ...] = ()
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or not name:
            raise RequestError("tool_choice must name a function: {type: function, function: {name}}", "tool_choice")
        if name not in names:
            raise RequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        next_id = sum(len(m.get("tool_calls") or []) for m in chat_messages)
        forced = (call_start, *tokenizer.encode(f"call_{next_id} {name}"))
    elif choice == "required":
        if not tools:
            raise RequestError("tool_choice 'required' needs at least one tool in tools", "tool_choice")
        forced = (call_start,)
    elif choice == "none":
        banned = (call_start, call_end)
    elif choice != "auto":
        raise RequestError(
            f"tool_choice must be 'none', 'auto', 'required' or a named function, not {choice!r}", "tool_choice"
        )
    try:
        text = render(chat_messages, add_generation_prompt=True, tools=tools or None)
    except (ChatFormatError, KeyError, TypeError) as e:
        raise RequestError(str(e), "messages") from None
    return Prompt(tokenizer.encode(text), forced, banned, names)


@dataclass
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments: str  # a fragment; the fragments of one call concatenate to its arguments


@dataclass
class Delta:
    """What one step of a reply adds: text, finished tool calls, and the log-probs of the tokens it covers."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls or self.logprobs)


ARGUMENT_FRAGMENT_CHARS = 16


class ReplyAssembler:
    """Generated tokens -> content deltas and tool calls, with OpenAI's stop strings.

    Content streams as it is decoded (text ending in an incomplete UTF-8 character, or in what may be the start
    of a stop string, is held back). From the first tool-call token on, the rest of the reply is held until it
    ends and then parsed with the chat format's own `parse_assistant`: well-formed calls come out as tool-call
    deltas (header, then argument fragments), a malformed one as plain content, never an error.
    """

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), logprobs: bool = False, tool_calls: bool = True
    ) -> None:
        self.tokenizer, self.stop, self.want_logprobs = tokenizer, [s for s in stop if s], logprobs
        self.parse_tool_calls = tool_calls
        self.call_start = tokenizer.token_id(TOOL_CALL_START)
        self.ids: list[int] = []
        self.content_ids: list[int] | None = None  # the ids before the first tool-call token, once there is one
        self.emitted = ""  # content sent so far
        self.stopped_by_string = False
        self.content = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self._pending_logprobs: list[dict[str, Any]] = []
        self.logprob_entries: list[dict[str, Any]] = []  # every token's, for non-streamed replies

    def _logprob_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> dict[str, Any]:
        def one(t: int, lp: float) -> dict[str, Any]:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**one(token_id, logprob), "top_logprobs": [one(t, lp) for t, lp in (top or [])]}

    def feed(self, token_id: int, logprob: float = 0.0, top: list[tuple[int, float]] | None = None) -> Delta:
        """Add one generated (non-stop) token; returns what can be sent now."""
        if self.stopped_by_string or self.finish_reason is not None:
            return Delta()
        self.ids.append(token_id)
        if self.want_logprobs:
            entry = self._logprob_entry(token_id, logprob, top)
            self._pending_logprobs.append(entry)
            self.logprob_entries.append(entry)
        if self.parse_tool_calls and self.content_ids is None and token_id == self.call_start:
            self.content_ids = self.ids[:-1]
        if self.content_ids is not None:
            return Delta(logprobs=self._take_logprobs())
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped_by_string = True
                text = text[:at]
        if not self.stopped_by_string:
            if text.endswith("\ufffd"):
                return Delta(logprobs=self._take_logprobs())
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += new
        return Delta(new, logprobs=self._take_logprobs())

    def _take_logprobs(self) -> list[dict[str, Any]]:
        taken, self._pending_logprobs = self._pending_logprobs, []
        return taken

    def finish(self, engine_reason: str) -> Delta:
        """The sequence ended ("stop", "length", ...): flush, parse tool calls, set finish_reason."""
        if self.stopped_by_string:
            self.content, self.finish_reason = self.emitted, "stop"
            return Delta(logprobs=self._take_logprobs())
        text = self.tokenizer.decode(self.ids)
        delta = Delta(logprobs=self._take_logprobs())
        if self.parse_tool_calls:
            message = parse_assistant(text + END_OF_TURN)
            calls, self.content = message.get("tool_calls") or [], message.get("content") or ""
        else:
            calls, self.content = [], text
        if calls:
            for index, call in enumerate(calls):
                api_call = {"id": new_tool_call_id(), "type": "function", "function": dict(call["function"])}
                self.tool_calls.append(api_call)
                arguments = api_call["function"]["arguments"]
                pieces = [
                    arguments[k : k + ARGUMENT_FRAGMENT_CHARS]
                    for k in range(0, len(arguments), ARGUMENT_FRAGMENT_CHARS)
                ] or [""]
                delta.tool_calls.append(ToolCallDelta(index, api_call["id"], api_call["function"]["name"], ""))
                delta.tool_calls.extend(ToolCallDelta(index, "", "", piece) for piece in pieces)
        if self.content.startswith(self.emitted):
            delta.content = self.content[len(self.emitted) :]
        self.emitted = self.content
        self.finish_reason = "tool_calls" if calls else ("length" if engine_reason == "length" else "stop")
        return delta
