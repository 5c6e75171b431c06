"""API messages to prompts and generated tokens to replies, without a server: tool-call ids mapped both ways,
tool_choice constraints, malformed calls returned as content, stop strings held back and cut."""

from __future__ import annotations

import json

import pytest

from stagelm.chat import parse
from stagelm.serve.conversation import ReplyAssembler, RequestError, build_prompt, normalise_messages
from stagelm.tokenizer import ASSISTANT, TOOL_CALL_END, TOOL_CALL_START, CharTokenizer
from stagelm.tools import CALCULATOR_SCHEMA

TOKENIZER = CharTokenizer.train(['{"expression": "12 * 3"} calculator hello world = 36.'])


def call(call_id: str | None, expression: str) -> dict:
    fn = {"name": "calculator", "arguments": json.dumps({"expression": expression})}
    return {"id": call_id, "type": "function", "function": fn} if call_id else {"function": fn}


def test_client_ids_are_renumbered_and_tool_messages_mapped() -> None:
    messages = [
        {"role": "user", "content": "two sums"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_zz", "1 + 1"), call("call_aa", "2 + 2")]},
        {"role": "tool", "tool_call_id": "call_aa", "content": "4"},
        {"role": "tool", "tool_call_id": "call_zz", "content": "2"},
    ]
    out = normalise_messages(messages)
    assert [c["id"] for c in out[1]["tool_calls"]] == ["call_0", "call_1"]
    assert [(m["tool_call_id"], m["content"]) for m in out[2:]] == [("call_1", "4"), ("call_0", "2")]
    # Ollama: no ids, object arguments; each tool message answers the oldest unanswered call
    ollama_call = {"function": {"name": "calculator", "arguments": {"expression": "1 + 1"}}}
    ollama = [
        messages[0],
        {"role": "assistant", "content": "", "tool_calls": [ollama_call]},
        {"role": "tool", "content": "2"},
    ]
    out = normalise_messages(ollama)
    assert out[1]["tool_calls"][0]["function"]["arguments"] == '{"expression": "1 + 1"}'
    assert out[2]["tool_call_id"] == "call_0"
    text = TOKENIZER.decode(build_prompt(TOKENIZER, ollama).ids)
    assert text.endswith(ASSISTANT)  # ready for the reply
    assert parse(text[: -len(ASSISTANT)])[-1] == {"role": "tool", "tool_call_id": "call_0", "content": "2"}


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one message"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "tool", "tool_call_id": "x", "content": "1"}], "does not match"),
        ([{"role": "tool", "content": "1"}], "must answer an earlier"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text content"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "two words", "arguments": "{}"}}]}], "spaces"),
    ],
)
def test_bad_conversations_say_what_is_wrong(messages: list, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        build_prompt(TOKENIZER, messages)


def test_tool_choice_constraints() -> None:
    user = [{"role": "user", "content": "hello"}]
    start, end = TOKENIZER.token_id(TOOL_CALL_START), TOKENIZER.token_id(TOOL_CALL_END)
    assert build_prompt(TOKENIZER, user).banned_token_ids == (start, end)  # no tools: no calls
    assert build_prompt(TOKENIZER, user, [CALCULATOR_SCHEMA]).forced_prefix == ()
    assert build_prompt(TOKENIZER, user, [CALCULATOR_SCHEMA], "required").forced_prefix == (start,)
    named = build_prompt(TOKENIZER, user, [CALCULATOR_SCHEMA], {"type": "function", "function": {"name": "calculator"}})
    assert TOKENIZER.decode(named.forced_prefix) == f"{TOOL_CALL_START}call_0 calculator"
    with pytest.raises(RequestError, match="needs at least one tool"):
        build_prompt(TOKENIZER, user, [], "required")
    with pytest.raises(RequestError, match="not among the tools"):
        build_prompt(TOKENIZER, user, [CALCULATOR_SCHEMA], {"type": "function", "function": {"name": "search"}})


def assemble(text: str, stop: tuple[str, ...] = (), reason: str = "stop") -> tuple[ReplyAssembler, str]:
    assembler, streamed = ReplyAssembler(TOKENIZER, stop), ""
    for token in TOKENIZER.encode(text):
        streamed += assembler.feed(token).content
        if assembler.stopped_by_string:
            break
    streamed += assembler.finish(reason).content
    return assembler, streamed


def test_tool_calls_are_parsed_and_malformed_ones_are_content() -> None:
    good = f'{TOOL_CALL_START}call_0 calculator {{"expression": "12 * 3"}}{TOOL_CALL_END}'
    a, streamed = assemble(good)
    assert a.finish_reason == "tool_calls" and streamed == "" and a.content == ""
    assert a.tool_calls[0]["function"] == {"name": "calculator", "arguments": '{"expression": "12 * 3"}'}
    assert a.tool_calls[0]["id"].startswith("call_") and a.tool_calls[0]["id"] != "call_0"

    for broken in (
        f'hello {TOOL_CALL_START}call_0 calculator {{"expression": "12 * 3"{TOOL_CALL_END}',  # not JSON
        f"hello {TOOL_CALL_START}call_0 calculator",  # never closed (cut by max_tokens)
        f'{TOOL_CALL_START}calculator {{"expression": "1"}}{TOOL_CALL_END}',  # no id
    ):
        a, streamed = assemble(broken, reason="length")
        assert a.tool_calls == [] and a.content == streamed == broken and a.finish_reason == "length"


def test_stop_strings_are_held_back_and_cut() -> None:
    a, streamed = assemble("hello world = 36.", stop=("d =",))
    assert streamed == a.content == "hello worl" and a.finish_reason == "stop" and a.stopped_by_string
    a, streamed = assemble("hello world", stop=("d =",), reason="length")  # a partial match is released at the end
    assert streamed == "hello world" and a.finish_reason == "length"
