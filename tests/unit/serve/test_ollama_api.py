"""The Ollama-compatible routes, driven by the real `ollama` client: the tool round trip (arguments as objects,
tool messages without ids), streamed NDJSON chat, generate, tags, options and errors."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

import json
from pathlib import Path

import httpx

from stagelm.tools import CALCULATOR_SCHEMA, calculator
from tests.unit.serve.conftest import live_server, make_app

ollama = pytest.importorskip("ollama")

QUESTION = [{"role": "user", "content": "What is 1234 + 4321?"}]


def test_tool_round_trip(tool_server: str) -> None:
    client = ollama.Client(host=tool_server)
    first = client.chat(model="stagelm-sft", messages=QUESTION, tools=[CALCULATOR_SCHEMA], stream=False)
    assert first.done and first.done_reason == "stop"
    (call,) = first.message.tool_calls
    assert call.function.name == "calculator" and call.function.arguments == {"expression": "1234 + 4321"}
    assert first.prompt_eval_count > 0 and first.eval_count > 0 and first.total_duration > 0

    result = calculator(**call.function.arguments)
    messages = [*QUESTION, first.message, {"role": "tool", "content": result, "tool_name": "calculator"}]
    second = client.chat(model="stagelm-sft", messages=messages, tools=[CALCULATOR_SCHEMA], stream=False)
    assert "5555" in second.message.content and not second.message.tool_calls


def test_streamed_chat_is_ndjson_and_matches(tool_server: str) -> None:
    client = ollama.Client(host=tool_server)
    parts = list(client.chat(model="stagelm-sft", messages=QUESTION, tools=[CALCULATOR_SCHEMA], stream=True))
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done and parts[-1].eval_count > 0
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.arguments == {"expression": "1234 + 4321"}

    answer = [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calculator", "arguments": {
            "expression": "1234 + 4321"}}}]},
        {"role": "tool", "content": "5555"},
    ]  # fmt: skip
    streamed = list(client.chat(model="stagelm-sft", messages=answer, tools=[CALCULATOR_SCHEMA], stream=True))
    plain = client.chat(model="stagelm-sft", messages=answer, tools=[CALCULATOR_SCHEMA], stream=False)
    assert "".join(p.message.content for p in streamed) == plain.message.content == "1234 + 4321 = 5555."
    with httpx.stream("POST", f"{tool_server}/api/chat", json={"model": "stagelm-sft", "messages": answer}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])


def test_generate_tags_options_and_errors(random_tiny_checkpoint: Path) -> None:
    with live_server(make_app(random_tiny_checkpoint, temperature=1.0, max_tokens=16)) as url:
        client = ollama.Client(host=url)
        (model,) = client.list().models
        assert model.model == "stagelm-sft" and model.details.parameter_size.endswith("M") and model.size > 0

        options = {"seed": 7, "num_predict": 10, "temperature": 0.8}
        a = client.generate(model="stagelm-sft", prompt="hello", options=options, stream=False)
        b = client.generate(model="stagelm-sft:latest", prompt="hello", options=options, stream=False)
        assert a.response == b.response and a.done and a.eval_count <= 10
        streamed = "".join(
            p.response for p in client.generate(model="stagelm-sft", prompt="hello", options=options, stream=True)
        )
        assert streamed == a.response
        raw = client.generate(model="stagelm-sft", prompt="hello", raw=True, options=options, stream=False)
        assert raw.prompt_eval_count == 6  # BOS + 5 characters, no chat template
        for seed in range(5):  # num_predict caps the reply; a reply the model ends itself is "stop"
            short = client.chat(model="stagelm-sft", messages=[{"role": "user", "content": "hi"}],
                                options={"num_predict": 3, "seed": seed}, stream=False)  # fmt: skip
            assert short.eval_count <= 3 and short.done_reason in ("stop", "length")
            if short.done_reason == "length":
                assert short.eval_count == 3

        with pytest.raises(ollama.ResponseError) as info:
            client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False)
        assert info.value.status_code == 404 and "stagelm-sft" in info.value.error
        with pytest.raises(ollama.ResponseError) as info:
            client.chat(model="stagelm-sft", messages=[], stream=False)
        assert info.value.status_code == 400 and "messages" in info.value.error
        with pytest.raises(ollama.ResponseError) as info:
            client.chat(model="stagelm-sft", messages=[{"role": "user", "content": "x" * 300}], stream=False)
        assert info.value.status_code == 400 and "context" in info.value.error
        response = httpx.post(f"{url}/api/chat", json={"model": "stagelm-sft", "messages": [{"role": "bad"}]})
        assert response.status_code == 400 and isinstance(response.json()["error"], str)


def test_api_key_with_the_ollama_client(random_tiny_checkpoint: Path) -> None:
    with live_server(make_app(random_tiny_checkpoint, api_key="k", max_tokens=4)) as url:
        with pytest.raises(ollama.ResponseError) as info:
            ollama.Client(host=url).list()
        assert info.value.status_code == 401
        client = ollama.Client(host=url, headers={"Authorization": "Bearer k"})
        assert client.chat(model="stagelm-sft", messages=[{"role": "user", "content": "hi"}], stream=False).done
