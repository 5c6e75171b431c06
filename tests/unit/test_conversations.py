"""The built-in conversations: multi-turn rendering and loss masks turn by turn, several tool calls in one message,
the world's tool decision, the real tools' results, held-out follow-ups, and the chat metrics' checks."""

from __future__ import annotations

import json

import pytest

from stagelm.chat import parse, parse_assistant, render, render_for_training
from stagelm.chat_metrics import carries_result, decision_prompt, tool_calls_of
from stagelm.data import world
from stagelm.data.instruct import to_conversation
from stagelm.tokenizer import CharTokenizer
from stagelm.tools import convert, run_tool_call


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


TWO_TURNS = [
    {"role": "user", "content": "What is 4821 * 37?"},
    {"role": "assistant", "content": "", "tool_calls": [call("call_0", "calculator", {"expression": "4821 * 37"})]},
    {"role": "tool", "tool_call_id": "call_0", "content": "178377"},
    {"role": "assistant", "content": "4821 * 37 = 178377."},
    {"role": "user", "content": "Now subtract 7 from that."},
    {"role": "assistant", "content": "", "tool_calls": [call("call_1", "calculator", {"expression": "178377 - 7"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": "178370"},
    {"role": "assistant", "content": "178377 - 7 = 178370."},
]


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return {split: world.instruction_examples(split, 3000, seed=1) for split in world.SPLITS}


def test_multi_turn_loss_mask_turn_by_turn() -> None:
    tok = CharTokenizer.train([""])
    ex = render_for_training(tok, TWO_TURNS)
    assert tok.decode(ex.input_ids) == render(TWO_TURNS)
    spans, current = [], []  # the runs of trained tokens, decoded
    for token, trained in zip(ex.input_ids, ex.loss_mask):
        if trained:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans.append(tok.decode(current))
    assert spans == [
        '<|tool_call|>call_0 calculator {"expression": "4821 * 37"}<|/tool_call|><|end|>',
        "4821 * 37 = 178377.<|end|>",
        '<|tool_call|>call_1 calculator {"expression": "178377 - 7"}<|/tool_call|><|end|>',
        "178377 - 7 = 178370.<|end|>",
    ]
    # everything else, user turns, tool results and the <|assistant|> role tokens, is prompt
    untrained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if not m])
    assert untrained == (
        "<|bos|><|user|>What is 4821 * 37?<|end|><|assistant|><|tool|>call_0 178377<|end|><|assistant|>"
        "<|user|>Now subtract 7 from that.<|end|><|assistant|><|tool|>call_1 178370<|end|><|assistant|>"
    )


def test_several_calls_in_one_message_round_trip() -> None:
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            call("call_0", "calculator", {"expression": "4821 * 37"}),
            call("call_1", "convert", {"value": 5, "from_unit": "km", "to_unit": "m"}),
        ],
    }
    text = render([message])
    assert text == (
        '<|bos|><|assistant|><|tool_call|>call_0 calculator {"expression": "4821 * 37"}<|/tool_call|>'
        '<|tool_call|>call_1 convert {"value": 5, "from_unit": "km", "to_unit": "m"}<|/tool_call|><|end|>'
    )
    assert parse(text) == [message]
    assert parse_assistant(text.removeprefix("<|bos|><|assistant|>")) == message
    assert tool_calls_of(text.removeprefix("<|bos|><|assistant|>")) == [
        ("calculator", {"expression": "4821 * 37"}),
        ("convert", {"value": 5, "from_unit": "km", "to_unit": "m"}),
    ]
    assert [run_tool_call(c) for c in message["tool_calls"]] == ["178377", "5000"]


def test_world_records_round_trip_through_the_chat_format(records: dict) -> None:
    two_calls = [r for r in records["train"] if r["family"] == "two_calls"]
    assert len(two_calls) > 20
    for record in two_calls + records["train"][:300]:
        assert parse(render(record["messages"])) == record["messages"]
    assert all(len(r["messages"][-4]["tool_calls"]) == 2 for r in two_calls)


def test_decision_rule_and_tool_results(records: dict) -> None:
    assert not world.needs_calculator(23, "+", 48) and not world.needs_calculator(12, "*", 12)
    assert world.needs_calculator(4821, "*", 37) and world.needs_calculator(13, "*", 2)
    assert world.needs_calculator(150, "-", 7)
    assert convert(5, "km", "m") == "5000" and convert(300, "cm", "m") == "3"
    assert convert(5, "km", "kg") == "error: cannot convert km to kg"
    for split, recs in records.items():
        for record in recs:
            messages = record["messages"]
            calls = {c["id"]: c for m in messages for c in m.get("tool_calls", [])}
            for m in messages:  # every result is what the real tool says
                if m["role"] == "tool":
                    assert m["content"] == run_tool_call(calls[m["tool_call_id"]])
            last_user = len(decision_prompt(to_conversation(record, split)))
            made = [c for m in messages[last_user:] for c in m.get("tool_calls", [])]
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in made] == [
                (c["name"], c["arguments"]) for c in record["needed_calls"]
            ]
            question = next(m for m in record.get("standalone", messages) if m["role"] == "user")["content"]
            if record["family"] in ("add", "sub", "tool") and not made or record["family"] == "tool":
                ((a, op, b, _),) = world._parse_prompt(question).steps
                assert bool(made) == world.needs_calculator(a, op, b), record
            results = [m["content"] for m in messages[last_user:] if m["role"] == "tool"]
            if record["style"] == "canonical":  # the final reply carries each result exactly
                assert all(carries_result(messages[-1]["content"], r) for r in results), record
        needing_none = [r for r in recs if not any(m.get("tool_calls") for m in r["messages"])]
        offered = sum("tools" in r for r in needing_none) / len(needing_none)
        assert 0.5 < offered < 0.7  # tools in context far more often than needed
        assert all("tools" in r for r in recs if any(m.get("tool_calls") for m in r["messages"]))
    errors = [r for r in records["train"] if r["family"] == "tool_error"]
    assert errors and all(r["answer"] is None and "could not" in r["messages"][-1]["content"] for r in errors)


def test_multi_turn_shapes(records: dict) -> None:
    recs = records["train"]
    turns = [r["turns"] for r in recs]
    assert set(turns) == {1, 2, 3, 4} and 0.25 < sum(t > 1 for t in turns) / len(turns) < 0.5
    users = [m["content"] for r in recs for m in r["messages"] if m["role"] == "user"]
    assert any(u.startswith(("And ", "What about ")) for u in users)
    assert any(u.endswith("from that.") for u in users)
    words = [r for r in recs if r["messages"][0] == {"role": "system", "content": "Answer in words."}]
    # the working first, then the answer in words: "54 + 91 = 145, in words one hundred forty-five."
    for r in words:
        for m in (m for m in r["messages"] if m["role"] == "assistant"):
            equation, spelled = m["content"].removesuffix(".").split(", in words ")
            a, op, b, _, c = equation.split()
            assert int(c) == world._OPS[op](int(a), int(b)) and spelled == world.number_to_words(int(c))
        assert r["messages"][-1]["content"].endswith(f", in words {r['answer']}.")
    assert words and all(not any(c.isdigit() for c in r["answer"]) for r in words)
    # "Reply with the number only." is for results a tool gives: every such turn calls one
    bare = [r for r in recs if r["messages"][0] == {"role": "system", "content": "Reply with the number only."}]
    assert bare and all(r["family"] in ("tool", "convert", "tool_error") for r in bare)
    for r in bare:
        replies = [i for i, m in enumerate(r["messages"]) if m["role"] == "assistant" and m.get("content")]
        assert all(r["messages"][i - 1]["role"] == "tool" for i in replies), r
    for record in recs:
        if record["turns"] > 1:  # asked alone: the same system prompt, the question spelled out, the same answer
            alone = to_conversation({"messages": record["standalone"], "answer": record["answer"]}, "alone")
            assert alone.reference == record["messages"][-1]["content"] or record["style"] != "canonical"
            assert [m["role"] for m in record["standalone"] if m["role"] == "user"] == ["user"]


def test_heldout_follow_ups_are_disjoint(records: dict) -> None:
    """Each held-out follow-up asks a held-out item, and no held-out question appears in training."""
    follow_ups = [r for r in records["val"] if r["turns"] > 1]
    assert len(follow_ups) > 500
    checked = 0
    for record in follow_ups:
        question = next(m for m in record["standalone"] if m["role"] == "user")["content"]
        if record["family"] in ("add", "sub", "tool"):
            ((a, op, b, _),) = world._parse_prompt(question).steps
            assert world.split_of(a, op, b) == "val", question
            checked += 1
        elif record["family"] == "convert":
            args = record["needed_calls"][0]["arguments"]
            assert world._convert_split(args["value"], args["from_unit"], args["to_unit"]) == "val"
    assert checked > 300
    train_text = "\n".join(
        m["content"] + "".join(c["function"]["arguments"] for c in m.get("tool_calls", []))
        for r in records["train"]
        for m in r["messages"] + r.get("standalone", [])
    )
    for record in follow_ups[:200]:
        question = next(m for m in record["standalone"] if m["role"] == "user")["content"]
        if record["family"] in ("add", "sub", "tool", "convert"):
            assert question not in train_text, question


def test_carries_result_and_decision_prompt() -> None:
    assert carries_result("4821 * 37 = 178377.", "178377")
    assert not carries_result("4821 * 37 = 178376.", "178377")
    assert not carries_result("It is 1783770.", "178377")  # a longer number is not the result
    assert carries_result(
        "The convert tool could not do it (cannot convert km to kg).", "error: cannot convert km to kg"
    )
    conv = to_conversation({"messages": TWO_TURNS}, "hand")
    assert decision_prompt(conv) == TWO_TURNS[:5]
    assert conv.prompt == TWO_TURNS[:7]
    assert tool_calls_of("4821 * 37 = 178377.<|end|>") == []
    assert tool_calls_of('<|tool_call|>call_0 calculator {"expression": <|end|>') is None
