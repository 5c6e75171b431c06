"""Serving the small SFT checkpoint (slow: it trains the session's small checkpoints): held-out calculator
questions go through the whole tool round trip with the real `openai` and `ollama` clients -- request, tool
call, the calculator's result sent back, an answer that contains it -- streamed and not."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

import json
from pathlib import Path

from stagelm.data.instruct import builtin_conversations
from stagelm.tools import CALCULATOR_SCHEMA, calculator, run_tool_call
from tests.unit.serve.conftest import live_server, make_app

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.slow


def held_out_tool_questions(n: int) -> list[dict]:
    """The first user turn of held-out conversations of the tool family (numbers never seen in training)."""
    conversations = [c for c in builtin_conversations("val", 300, seed=0, quality=1.0) if c.family == "tool"]
    return [c.prompt[0] for c in conversations[:n]]


def test_tool_round_trip_with_the_small_sft_model(small_sft_checkpoint: Path) -> None:
    questions = held_out_tool_questions(10)
    assert len(questions) == 10
    with live_server(make_app(small_sft_checkpoint, temperature=0.0, max_tokens=96)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        complete, first_call = 0, None
        for question in questions:
            reply = client.chat.completions.create(model="stagelm-sft", messages=[question], tools=[CALCULATOR_SCHEMA])
            message = reply.choices[0].message
            if reply.choices[0].finish_reason != "tool_calls":
                continue
            (call,) = message.tool_calls
            assert call.function.name == "calculator" and "expression" in json.loads(call.function.arguments)
            result = run_tool_call(call.model_dump())
            messages = [
                question,
                message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": result},
            ]
            answer = client.chat.completions.create(model="stagelm-sft", messages=messages, tools=[CALCULATOR_SCHEMA])
            complete += result in (answer.choices[0].message.content or "")
            first_call = first_call or (question, call)
        print(f"\nfull tool round trips: {complete}/{len(questions)}")
        assert complete >= 8

        # streamed: the same call, in fragments that concatenate to the same arguments
        question, call = first_call
        chunks = list(
            client.chat.completions.create(
                model="stagelm-sft", messages=[question], tools=[CALCULATOR_SCHEMA], stream=True
            )
        )
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "calculator" and deltas[0].id.startswith("call_")
        assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]

        # the ollama client: arguments as an object, the tool message without an id
        ollama_client = ollama.Client(host=url)
        first = ollama_client.chat(model="stagelm-sft", messages=[question], tools=[CALCULATOR_SCHEMA], stream=False)
        (ollama_call,) = first.message.tool_calls
        result = calculator(**ollama_call.function.arguments)
        messages = [question, first.message, {"role": "tool", "content": result, "tool_name": "calculator"}]
        answer = ollama_client.chat(model="stagelm-sft", messages=messages, tools=[CALCULATOR_SCHEMA], stream=False)
        assert result in answer.message.content
