"""Property-based tests (Hypothesis): malformed input never gives an internal traceback. Random and mutated JSONL
records make every reader either read them or raise a DataError naming file:line (and the field); random text and
message lists make the chat renderer raise only ChatFormatError and the reply parser never raise; random tool calls
come back as text; the reward functions return a bounded finite score for any reply."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagelm.chat import ChatFormatError, parse, parse_assistant, render
from stagelm.data.instruct import read_conversations
from stagelm.data.math import read_problems
from stagelm.data.preference import read_pairs
from stagelm.data.prompts import read_prompts
from stagelm.data.text import read_documents
from stagelm.errors import DataError
from stagelm.rewards import REWARD_FUNCTIONS
from stagelm.tokenizer import SPECIAL_TOKENS
from stagelm.tools import calculator, run_tool_call

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- generators ---------------------------------------------------------------------------------------------------
json_scalars = (
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# text with the chat format's special tokens mixed in, where parsers are most likely to trip
chat_text = st.lists(
    st.sampled_from([*SPECIAL_TOKENS, "<|tool_call|>", " ", "{", "}", '"', "\n"]) | st.text(max_size=8), max_size=12
).map("".join)
roles = st.sampled_from(["system", "user", "assistant", "tool", "robot", "", None, 3])
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={
            "content": st.none() | chat_text | st.integers() | st.lists(st.text(max_size=4), max_size=2),
            "tool_calls": json_values
            | st.lists(
                st.fixed_dictionaries(
                    {
                        "id": st.text(max_size=5) | st.integers(),
                        "function": json_values
                        | st.fixed_dictionaries({"name": st.text(max_size=5), "arguments": json_values}),
                    }
                ),
                max_size=2,
            ),
            "tool_call_id": json_values,
        },
    )
    | json_values,
    max_size=4,
)

VALID = {  # one well-formed record per reader and format
    "instruct": [
        {"prompt": "What is 2 + 3?", "completion": "5", "answer": "5"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
    ],
    "preference": [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
    ],
    "prompts": [{"prompt": "What is 2 + 3?", "answer": 5}, {"messages": [{"role": "user", "content": "hi"}]}],
    "math": [
        {"prompt": "What is 2 + 3?", "answer": "5", "level": 1},
        {"question": "Tom has 2 and gets 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
    ],
    "text": [{"text": "some text"}],
}
READERS = {
    "instruct": read_conversations,
    "preference": read_pairs,
    "prompts": read_prompts,
    "math": read_problems,
    "text": read_documents,
}


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> Any:
    """A valid record of `kind` after one or two mutations: a field dropped, replaced by a random value or
    message list, one of its messages' fields changed, or a field added."""
    record = json.loads(json.dumps(draw(st.sampled_from(VALID[kind]))))
    for _ in range(draw(st.integers(1, 2))):
        action = draw(st.sampled_from(["drop", "replace", "message", "message", "add"]))
        if not record:
            break
        key = draw(st.sampled_from(sorted(record)))
        if action == "drop":
            del record[key]
        elif action == "replace":
            record[key] = draw(json_values | messages)
        elif action == "message" and isinstance(record[key], list) and record[key]:
            target = draw(st.sampled_from(record[key]))
            if isinstance(target, dict):
                field = draw(st.sampled_from(["role", "content", "tool_calls", "tool_call_id"]))
                target[field] = draw(json_values | roles | messages)
        elif action == "add":
            record[draw(st.sampled_from(["tools", "answer", "level", "family", "solution", "input"]))] = draw(
                json_values | messages
            )
    return record


def records_file(kind: str) -> st.SearchStrategy[list[str]]:
    return st.lists(mutated(kind).map(json.dumps), min_size=1, max_size=3)


def garbage_file(kind: str) -> st.SearchStrategy[list[str]]:
    record_line = mutated(kind).map(json.dumps)
    garbage = st.text(max_size=20) | json_values.map(json.dumps) | record_line.map(lambda s: s[: len(s) // 2])
    return st.lists(record_line | garbage, min_size=1, max_size=4)


# --- properties -----------------------------------------------------------------------------------------------
LOCATED = re.compile(r"^(?P<path>.+?):(?P<line>\d+): ")


@pytest.mark.parametrize("garbage", [False, True], ids=["mutated-records", "garbage-lines"])
@pytest.mark.parametrize("kind", sorted(READERS))
@FUZZ
@given(data=st.data())
def test_jsonl_readers_read_or_name_file_and_line(
    kind: str, garbage: bool, data: st.DataObject, tmp_path: Path
) -> None:
    content = data.draw(garbage_file(kind) if garbage else records_file(kind))
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(content) + "\n", encoding="utf-8")
    try:
        items = READERS[kind](str(path))
    except DataError as e:
        message = str(e)
        located = LOCATED.match(message)
        if located is None:  # only whole-file problems may go without a line
            assert str(path) in message and ("no records" in message or "holds no text" in message), message
        else:
            # a garbage line may hold line breaks of its own: the file's lines, not the drawn entries, bound it
            n_lines = len(path.read_text(encoding="utf-8").splitlines())
            assert located["path"] == str(path) and 1 <= int(located["line"]) <= n_lines, message
        return
    for item in items:  # what a reader accepts, the chat format renders (no surprise when training starts)
        if kind in ("instruct", "prompts", "math"):
            render(item.messages, tools=getattr(item, "tools", None))
        elif kind == "preference":
            render(item.prompt + item.chosen, tools=item.tools)
            render(item.prompt + item.rejected, tools=item.tools)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"instruction": None, "output": "5"}, "'instruction' must be a string"),  # found by the fuzz test above
        ({"instruction": "Add", "output": 5}, "'output' must be a string"),
        ({"instruction": "Add", "input": [2, 3], "output": "5"}, "'input' must be a string or null"),
    ],
)
def test_instruction_records_with_a_wrong_field_name_file_line_and_field(
    record: dict, field: str, tmp_path: Path
) -> None:
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": None, "output": "5"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {field}")):
        read_conversations(str(path))


@FUZZ
@given(text=chat_text)
def test_parse_assistant_never_raises(text: str) -> None:
    message = parse_assistant(text)
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    for call in message.get("tool_calls", []):
        json.loads(call["function"]["arguments"])  # a call is only ever returned with JSON arguments


@FUZZ
@given(text=chat_text)
def test_parse_raises_only_chat_format_errors(text: str) -> None:
    try:
        parse(text)
    except ChatFormatError:
        pass


@FUZZ
@given(conversation=messages, tools=st.none() | json_values)
def test_render_raises_only_chat_format_errors(conversation: list[Any], tools: Any) -> None:
    try:
        text = render(conversation, add_generation_prompt=True, tools=tools)
    except ChatFormatError:
        return
    assert isinstance(text, str)


@FUZZ
@given(call=json_values | messages)
def test_tool_calls_come_back_as_text(call: Any) -> None:
    assert isinstance(run_tool_call(call), str)


@FUZZ
@given(expression=st.text(alphabet="0123456789+-*/(). e,x", max_size=30) | st.text(max_size=30))
def test_calculator_answers_or_reports_an_error(expression: str) -> None:
    out = calculator(expression)
    assert isinstance(out, str) and out


@pytest.mark.parametrize("name", sorted(REWARD_FUNCTIONS))
@settings(max_examples=40, deadline=None)
@given(reply=chat_text | st.text(max_size=60), answer=st.text(max_size=10) | st.integers() | st.floats(allow_nan=False))
def test_reward_functions_give_a_bounded_score_for_any_reply(name: str, reply: str, answer: Any) -> None:
    score = REWARD_FUNCTIONS[name](reply, answer)
    assert isinstance(score, float) and math.isfinite(score) and -1.0 <= score <= 1.0, score
