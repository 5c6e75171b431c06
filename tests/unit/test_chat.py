"""The chat format: rendering, parsing, tool-call round trips, the assistant-only loss mask."""

from __future__ import annotations

import pytest

from stagelm.chat import ChatFormatError, parse, parse_assistant, render, render_for_training
from stagelm.data.instruct import IGNORE_INDEX, SFTCollator
from stagelm.tokenizer import CharTokenizer

CALL = {
    "id": "call_0",
    "type": "function",
    "function": {"name": "calculator", "arguments": '{"expression": "4821 * 37"}'},
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 4821 * 37?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_0", "content": "178377"},
    {"role": "assistant", "content": "4821 * 37 = 178377."},
]


def test_render_exact_text() -> None:
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    assert render(messages) == "<|bos|><|user|>What is 2 + 3?<|end|><|assistant|>2 + 3 = 5.<|end|>"
    assert render(messages[:1], add_generation_prompt=True) == "<|bos|><|user|>What is 2 + 3?<|end|><|assistant|>"


def test_render_tool_calls_exact_text() -> None:
    assert render(TOOL_CONVERSATION) == (
        "<|bos|><|system|>Be brief.<|end|><|user|>What is 4821 * 37?<|end|>"
        '<|assistant|><|tool_call|>call_0 calculator {"expression": "4821 * 37"}<|/tool_call|><|end|>'
        "<|tool|>call_0 178377<|end|><|assistant|>4821 * 37 = 178377.<|end|>"
    )


def test_render_then_parse_round_trips_exactly() -> None:
    assert parse(render(TOOL_CONVERSATION)) == TOOL_CONVERSATION
    two_calls = {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            CALL,
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x y"}'}},
        ],
    }
    assert parse(render([two_calls])) == [two_calls]


def test_tools_are_described_in_the_system_turn() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluates arithmetic.",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
            },
        }
    ]
    text = render([{"role": "user", "content": "hi"}], tools=tools)
    assert text.startswith("<|bos|><|system|>Tools you can call:\ncalculator(expression): Evaluates arithmetic.")


def test_parse_generated_reply() -> None:
    assert parse_assistant("7 + 8 = 15.<|end|>garbage after") == {"role": "assistant", "content": "7 + 8 = 15."}
    assert parse_assistant("7 + 8 = 1")["finished"] is False
    reply = parse_assistant('<|tool_call|>call_0 calculator {"expression": "2*3"}<|/tool_call|><|end|>')
    assert reply["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "2*3"}'}


@pytest.mark.parametrize(
    "text",
    [
        "<|tool_call|>call_0 calculator {not json<|/tool_call|><|end|>",
        "<|tool_call|>call_0 calculator {}<|end|>",  # never closed
        "<|tool_call|>call_0<|/tool_call|><|end|>",  # no name or arguments
        "text <|/tool_call|><|end|>",
    ],
)
def test_malformed_tool_calls_come_back_as_flagged_content(text: str) -> None:
    message = parse_assistant(text)
    assert message["malformed_tool_call"] is True
    assert message["content"] == text.split("<|end|>")[0]


def test_bad_messages_name_the_turn() -> None:
    with pytest.raises(ChatFormatError, match="message 1: unknown role 'robot'"):
        render([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    with pytest.raises(ChatFormatError, match="message 0: a tool message needs a string 'tool_call_id'"):
        render([{"role": "tool", "content": "1"}])


def test_loss_mask_position_by_position() -> None:
    tok = CharTokenizer.train([""])
    messages = [
        {"role": "user", "content": "2+3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
    ]
    ex = render_for_training(tok, messages)
    pieces = [
        "<|bos|>",
        "<|user|>",
        "2",
        "+",
        "3",
        "<|end|>",
        "<|assistant|>",
        "5",
        "<|end|>",
        "<|user|>",
        "1",
        "+",
        "1",
        "<|end|>",
        "<|assistant|>",
        "2",
        "<|end|>",
    ]
    assert [tok.decode([i]) for i in ex.input_ids] == pieces
    expected = [False] * 7 + [True, True] + [False] * 6 + [True, True]
    assert ex.loss_mask == expected


def test_collator_shifts_labels_masks_prompt_and_padding() -> None:
    tok = CharTokenizer.train([""])
    a = render_for_training(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}])
    b = render_for_training(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    batch = SFTCollator(tok.pad_id)([(a.input_ids, a.loss_mask), (b.input_ids, b.loss_mask)])
    # a = [bos, user, a, end, assistant, b, c, end]: inputs drop the last token, labels the first
    assert batch["input_ids"].shape == (2, 7)
    b_, c_, end = tok.encode("b")[0], tok.encode("c")[0], tok.token_id("<|end|>")
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 4 + [b_, c_, end]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 4 + [b_, end, IGNORE_INDEX]
    assert batch["input_ids"][1, -1].item() == tok.pad_id
