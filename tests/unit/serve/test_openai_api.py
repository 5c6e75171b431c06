"""The OpenAI-compatible routes, driven by the real `openai` client against a server on a local port: the tool
round trip with a model that really calls the calculator, the same call streamed, tool_choice, sampling
options, and every error case with its status and OpenAI's error shape."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from stagelm.tools import CALCULATOR_SCHEMA, run_tool_call
from tests.unit.serve.conftest import live_server, make_app, random_checkpoint

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is 4821 * 37?"}]
TOOLS = [CALCULATOR_SCHEMA]


def client_for(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def random_server(random_tiny_checkpoint: Path) -> Iterator[str]:
    """An untrained tiny model (256-token context), sampled at temperature 1 unless a request says otherwise."""
    with live_server(make_app(random_tiny_checkpoint, temperature=1.0, top_p=None, max_tokens=16)) as url:
        yield url


def test_tool_round_trip(tool_server: str) -> None:
    client = client_for(tool_server)
    first = client.chat.completions.create(model="stagelm-sft", messages=QUESTION, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "4821 * 37"}
    assert call.id.startswith("call_") and call.id != "call_0"  # fresh ids, not the model's own numbering
    assert first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    result = run_tool_call(call.model_dump())
    assert result == "178377"
    messages = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    second = client.chat.completions.create(model="stagelm-sft", messages=messages, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert "178377" in second.choices[0].message.content

    # ids are unique: a second call of the same request gets another id
    again = client.chat.completions.create(model="stagelm-sft", messages=QUESTION, tools=TOOLS)
    assert again.choices[0].message.tool_calls[0].id != call.id


def test_streamed_tool_call_matches_the_non_streamed_one(tool_server: str) -> None:
    client = client_for(tool_server)
    plain = client.chat.completions.create(model="stagelm-sft", messages=QUESTION, tools=TOOLS)
    chunks = list(
        client.chat.completions.create(
            model="stagelm-sft", messages=QUESTION, tools=TOOLS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "tool_calls"
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    header = deltas[0]
    assert header.index == 0 and header.id.startswith("call_") and header.function.name == "calculator"
    assert all(d.index == 0 and d.id is None for d in deltas[1:]) and len(deltas) > 2
    streamed_arguments = "".join(d.function.arguments or "" for d in deltas)
    assert streamed_arguments == plain.choices[0].message.tool_calls[0].function.arguments
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # the wire format ends with [DONE]
    body = {"model": "stagelm-sft", "messages": QUESTION, "tools": TOOLS, "stream": True}
    with httpx.stream("POST", f"{tool_server}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_streamed_text_equals_the_non_streamed_text(tool_server: str) -> None:
    client = client_for(tool_server)
    messages = [
        *QUESTION,
        {"role": "assistant", "tool_calls": [{"id": "abc", "type": "function", "function": {
            "name": "calculator", "arguments": '{"expression": "4821 * 37"}'}}]},
        {"role": "tool", "tool_call_id": "abc", "content": "178377"},
    ]  # fmt: skip
    plain = client.chat.completions.create(model="stagelm-sft", messages=messages, tools=TOOLS)
    chunks = list(client.chat.completions.create(model="stagelm-sft", messages=messages, tools=TOOLS, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content == "4821 * 37 = 178377."
    assert len([c for c in chunks if c.choices[0].delta.content]) > 3  # token by token, not in one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_tool_choice_none_forbids_calls_and_required_forces_one(tool_server: str, random_server: str) -> None:
    client = client_for(tool_server)
    reply = client.chat.completions.create(model="stagelm-sft", messages=QUESTION, tools=TOOLS, tool_choice="none")
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
    assert "<|tool_call|>" not in (reply.choices[0].message.content or "")

    # an untrained model, forced: the reply opens with a call to the named function, parsed or (if what the
    # model wrote after the forced prefix is not valid JSON) returned as plain content, never an error
    named = {"type": "function", "function": {"name": "calculator"}}
    for tool_choice in (named, "required"):
        for seed in range(3):
            r = client_for(random_server).chat.completions.create(
                model="stagelm-sft", messages=[{"role": "user", "content": "hello"}], tools=TOOLS,
                tool_choice=tool_choice, seed=seed, max_tokens=40,
            )  # fmt: skip
            message = r.choices[0].message
            if message.tool_calls:
                assert r.choices[0].finish_reason == "tool_calls"
                assert tool_choice != named or message.tool_calls[0].function.name == "calculator"
            else:
                prefix = "<|tool_call|>call_0 calculator" if tool_choice == named else "<|tool_call|>"
                assert message.content.startswith(prefix), message.content
                assert r.choices[0].finish_reason in ("stop", "length")


def test_seed_makes_sampling_reproducible_under_concurrent_load(random_server: str) -> None:
    client = client_for(random_server)
    request = dict(model="stagelm-sft", messages=[{"role": "user", "content": "hello"}], seed=1234, max_tokens=24)
    alone = client.chat.completions.create(**request).choices[0].message.content
    results: list[str] = []

    def other(seed: int) -> None:
        client.chat.completions.create(**{**request, "seed": seed, "max_tokens": 40})

    threads = [threading.Thread(target=other, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    results.append(client.chat.completions.create(**request).choices[0].message.content)
    for t in threads:
        t.join()
    different = client.chat.completions.create(**{**request, "seed": 99}).choices[0].message.content
    assert results[0] == alone and different != alone


def test_n_logprobs_stop_and_routing(random_server: str) -> None:
    client = client_for(random_server)
    r = client.chat.completions.create(
        model="stagelm-sft", messages=[{"role": "user", "content": "hello"}], n=2, seed=3, max_tokens=12,
        logprobs=True, top_logprobs=3, extra_body={"stagelm": {"routing": True}},
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content  # seeds 3 and 4
    for c in r.choices:
        entries = c.logprobs.content
        assert "".join(e.token for e in entries) == c.message.content or c.finish_reason == "stop"
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
        assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices) + sum(
        c.finish_reason == "stop" for c in r.choices
    )
    routing = r.model_extra["stagelm"]["routing"]
    (layer,) = routing[0]  # the tiny model has one MoE layer, layer 1
    stats = routing[0][layer]
    assert abs(sum(stats["expert_load"]) - 1) < 1e-3 and stats["router_entropy"] >= 0
    assert sum(stats["expert_tokens"]) == r.usage.prompt_tokens + len(r.choices[0].logprobs.content)

    # a stop string ends the reply before it and is not part of it
    long = client.chat.completions.create(model="stagelm-sft", messages=[{"role": "user", "content": "x"}],
                                          seed=5, max_tokens=16, temperature=0)  # fmt: skip
    text = long.choices[0].message.content
    stop = text[5:7]
    cut = client.chat.completions.create(model="stagelm-sft", messages=[{"role": "user", "content": "x"}],
                                         seed=5, max_tokens=16, temperature=0, stop=[stop])  # fmt: skip
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
        ({"max_tokens": 1000}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "1"}]}, "messages[0].tool_call_id"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_invalid_requests_are_400_with_openai_error_shape(random_server: str, request_fields: dict, param) -> None:
    fields = {"model": "stagelm-sft", "messages": [{"role": "user", "content": "hi"}], **request_fields}
    with pytest.raises(openai.BadRequestError) as info:
        client_for(random_server).chat.completions.create(**fields)
    error = _error(info.value)
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_prompt_longer_than_the_context_is_context_length_exceeded(random_server: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client_for(random_server).chat.completions.create(
            model="stagelm-sft", messages=[{"role": "user", "content": "x" * 300}]
        )
    assert _error(info.value)["code"] == "context_length_exceeded" and "256" in _error(info.value)["message"]


def test_unknown_model_and_route_are_404(random_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client_for(random_server).chat.completions.create(model="gpt-4", messages=QUESTION)
    assert _error(info.value)["code"] == "model_not_found" and "stagelm-sft" in _error(info.value)["message"]
    assert httpx.get(f"{random_server}/v1/nothing-here").status_code == 404


def test_api_key_is_required_everywhere_but_health(random_tiny_checkpoint: Path) -> None:
    with live_server(make_app(random_tiny_checkpoint, api_key="s3cret", max_tokens=4)) as url:
        for headers in ({"Authorization": "Bearer wrong"}, {}):
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                                 ("POST", "/api/chat"), ("GET", "/api/tags"), ("GET", "/openapi.json")]:  # fmt: skip
                response = httpx.request(method, f"{url}{path}", headers=headers, json={})
                assert response.status_code == 401, (path, response.text)
        with pytest.raises(openai.AuthenticationError) as info:
            client_for(url, "wrong").models.list()
        assert _error(info.value)["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "models": ["stagelm-sft"]}
        client = client_for(url, "s3cret")
        assert [m.id for m in client.models.list()] == ["stagelm-sft"]
        assert client.chat.completions.create(model="stagelm-sft", messages=QUESTION).choices[0].message


def test_full_queue_is_429_with_retry_after_and_accepted_requests_complete(tmp_path: Path) -> None:
    app = make_app(random_checkpoint(tmp_path / "m.ckpt", max_seq_len=512), max_running=1, max_waiting=3)
    with live_server(app) as url:
        results: list[tuple[int, dict, dict]] = []
        lock = threading.Lock()

        def send() -> None:
            body = {"model": "stagelm-sft", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 300,
                    "temperature": 1.0, "seed": 0}  # fmt: skip
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            with lock:
                results.append((r.status_code, dict(r.headers), r.json()))

        threads = [threading.Thread(target=send) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(s for s, _, _ in results)
        assert statuses.count(200) >= 4 and statuses.count(429) >= 1 and set(statuses) == {200, 429}
        for status, headers, body in results:
            if status == 429:
                assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "rate_limit_exceeded"
            else:
                assert body["choices"][0]["finish_reason"] in ("stop", "length")
        # Hold the engine full with four open streams (1 running + 3 waiting): the openai client gets RateLimitError.
        # A stream's headers come back once its request is accepted, so entering the four means all are held.
        body = {"model": "stagelm-sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480,
                "min_tokens": 480, "stream": True}  # fmt: skip
        with contextlib.ExitStack() as streams, httpx.Client(timeout=60) as http:
            held = [
                streams.enter_context(http.stream("POST", f"{url}/v1/chat/completions", json=body)) for _ in range(4)
            ]
            assert [r.status_code for r in held] == [200] * 4
            with pytest.raises(openai.RateLimitError) as info:
                client_for(url).chat.completions.create(model="stagelm-sft", messages=QUESTION, max_tokens=5)
            assert _error(info.value)["type"] == "rate_limit_exceeded"
            assert int(info.value.response.headers["retry-after"]) >= 1
            engine = app.state.server.models["stagelm-sft"].engine
            steps_at_close = engine.steps
        # Closing the streams cancels their sequences: the engine is empty again after far fewer decode steps than
        # the rest of the four 480-token replies, one after another, would take (over 1,400). Counted in steps, not
        # seconds, so a busy machine that is slow to notice the disconnects does not fail it.
        deadline = time.monotonic() + 30
        while engine.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load == (0, 0) and engine.steps - steps_at_close < 480
        metrics = httpx.get(f"{url}/metrics").text
        assert 'stagelm_rejected_requests_total{model="stagelm-sft"}' in metrics
        assert 'stagelm_running_sequences{model="stagelm-sft"} 0.0' in metrics


def test_models_health_metrics_and_completions(random_server: str) -> None:
    client = client_for(random_server)
    (card,) = client.models.list().data
    assert card.id == "stagelm-sft" and card.model_extra["stage"] == "sft" and card.model_extra["context_length"] == 256

    text = client.completions.create(model="stagelm-sft", prompt="hello", max_tokens=8, seed=1, logprobs=2)
    choice = text.choices[0]
    assert choice.finish_reason in ("stop", "length") and text.usage.prompt_tokens == 6  # BOS + 5 characters
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs)
    streamed = client.completions.create(model="stagelm-sft", prompt="hello", max_tokens=8, seed=1, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    echoed = client.completions.create(model="stagelm-sft", prompt="hello", max_tokens=8, seed=1, echo=True)
    assert echoed.choices[0].text == "hello" + choice.text

    metrics = httpx.get(f"{random_server}/metrics").text
    for name in (
        'stagelm_http_requests_total{route="/v1/completions",status="200"}',
        "stagelm_completion_tokens_total",
        "stagelm_prompt_tokens_total",
        'stagelm_queue_depth{model="stagelm-sft"}',
        'stagelm_running_sequences{model="stagelm-sft"}',
        "stagelm_time_to_first_token_seconds_bucket",
        "stagelm_generation_duration_seconds_bucket",
        'stagelm_expert_tokens_total{expert="0",layer="1",model="stagelm-sft"}',
        "stagelm_router_entropy_nats_bucket",
    ):
        assert name in metrics, name
