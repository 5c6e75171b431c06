"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, plus /health and /metrics.

Streamed replies are server-sent events in OpenAI's chunk shape: a first chunk with the role, content deltas,
each tool call as a delta with its index, id and name followed by argument fragments, exactly one chunk per
choice with its finish_reason, a usage chunk with `stream_options.include_usage`, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from stagelm.serve.app import ApiError, ServerState
from stagelm.serve.conversation import STOP_TOKENS, Prompt, ReplyAssembler, RequestError, build_prompt
from stagelm.serve.engine import QueueFullError, SamplingParams
from stagelm.serve.registry import ServedModel
from stagelm.serve.runs import GenerationError, GenerationRun
from stagelm.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    NamedToolChoice,
    error_responses,
)

router = APIRouter()

ERRORS = error_responses(ErrorResponse)
STREAMED = {"text/event-stream": {"schema": {"type": "string"}, "example": "data: {...}\n\ndata: [DONE]\n\n"}}


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def stop_strings(stop: str | list[str] | None) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > 4:
        raise ApiError(400, "stop: at most 4 stop strings", param="stop")
    return [s for s in strings if s]


def sampling_params(
    served: ServedModel,
    prompt_tokens: int,
    requested_max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop_token_ids: tuple[int, ...],
    prompt: Prompt | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    max_tokens_param: str = "max_tokens",
    min_tokens: int = 0,
) -> SamplingParams:
    """The engine's settings from a request, with the server's defaults; 400 when the prompt does not fit."""
    context, limits = served.context_length, served.limits
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens}",
            param="messages",
            code="context_length_exceeded",
        )
    if requested_max_tokens is not None and requested_max_tokens > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens: the prompt ({prompt_tokens} tokens) leaves "
            f"room for {room}, not {max_tokens_param}={requested_max_tokens}",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    max_tokens = requested_max_tokens if requested_max_tokens is not None else min(limits.max_tokens, room)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=limits.temperature if temperature is None else temperature,
        top_p=limits.top_p if top_p is None else top_p,
        top_k=limits.top_k if top_k is None else top_k,
        seed=seed,
        stop_token_ids=stop_token_ids,
        forced_prefix=prompt.forced_prefix if prompt else (),
        banned_token_ids=prompt.banned_token_ids if prompt else (),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        min_tokens=min_tokens,
    )


def start_run(
    state: ServerState,
    served: ServedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    n: int,
    stop: list[str],
    tool_calls: bool = True,
) -> GenerationRun:
    """Submit to the engine: 429 with Retry-After when it is full."""
    try:
        return GenerationRun(served, prompt_ids, params, n, stop, state.metrics, tool_calls=tool_calls)
    except QueueFullError as e:
        state.metrics.rejected.labels(served.name).inc()
        raise ApiError(
            429,
            f"{served.name} is at capacity ({served.limits.max_running} running, {served.limits.max_waiting} "
            f"waiting); retry after {e.retry_after_s:.0f} s",
            type_="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"Retry-After": f"{e.retry_after_s:.0f}"},
        ) from None
    except ValueError as e:
        raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None


def stop_token_ids(served: ServedModel) -> tuple[int, ...]:
    return tuple(served.tokenizer.token_id(t) for t in STOP_TOKENS)


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _error_payload(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def _tool_calls_of(assembler: ReplyAssembler) -> list[dict[str, Any]] | None:
    return [dict(call) for call in assembler.tool_calls] or None


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    responses={**ERRORS, 200: {"content": STREAMED, "description": "The reply, or SSE chunks with stream=true"}},
    tags=["openai"],
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """Chat with a served model; tool calls come back in `choices[].message.tool_calls`."""
    state = server_state(request)
    served = state.model(body.model)
    stop = stop_strings(body.stop)
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    try:
        prompt = build_prompt(
            served.tokenizer,
            [m.model_dump(exclude_none=True) for m in body.messages],
            [t.model_dump(exclude_none=True) for t in body.tools] if body.tools is not None else None,
            tool_choice,
        )
    except RequestError as e:
        raise ApiError(400, e.message, param=e.param, code=e.code) from None
    if body.tools == [] and tool_choice not in (None, "none", "auto"):
        raise ApiError(400, "tools is empty but tool_choice requires a call", param="tool_choice")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        requested, param = min(body.max_tokens, body.max_completion_tokens), "max_completion_tokens"
    else:
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    want_logprobs = bool(body.logprobs)
    if body.top_logprobs and not want_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    params = sampling_params(
        served,
        len(prompt.ids),
        requested,
        body.temperature,
        body.top_p,
        body.top_k,
        body.seed,
        stop_token_ids(served),
        prompt,
        want_logprobs,
        body.top_logprobs or 0,
        param,
        body.min_tokens,
    )
    run = start_run(state, served, prompt.ids, params, body.n, stop)
    created, completion_id = int(time.time()), _completion_id("chatcmpl")
    want_routing = bool(body.stagelm and body.stagelm.routing)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_stream(run, served.name, completion_id, created, want_logprobs, include_usage, want_routing)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        assemblers = await run.collect()
    except GenerationError as e:
        raise ApiError(500, str(e), "server_error") from None
    choices = []
    for index, a in enumerate(assemblers):
        tool_calls = _tool_calls_of(a)
        content = a.content if (a.content or not tool_calls) else None
        logprobs = {"content": a.logprob_entries} if want_logprobs else None
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": content, "tool_calls": tool_calls},
                "logprobs": logprobs,
                "finish_reason": a.finish_reason,
            }
        )
    response: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": served.name,
        "choices": choices,
        "usage": run.usage,
    }
    if want_routing:
        response["stagelm"] = {"routing": run.routing}
    return response


async def _chat_stream(
    run: GenerationRun,
    model: str,
    completion_id: str,
    created: int,
    want_logprobs: bool,
    include_usage: bool,
    want_routing: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = None
        payload.update(extra)
        return _sse(payload)

    def choice(index: int, delta: dict[str, Any], logprobs=None, finish_reason=None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    for index in range(run.n):
        yield chunk([choice(index, {"role": "assistant", "content": ""})])
    try:
        async for update in run.updates():
            d = update.delta
            logprobs = {"content": d.logprobs} if want_logprobs and d.logprobs else None
            if d.content or logprobs:
                yield chunk([choice(update.index, {"content": d.content} if d.content else {}, logprobs)])
            for call in d.tool_calls:
                if call.id:
                    fn = {"name": call.name, "arguments": call.arguments}
                    delta = {"index": call.index, "id": call.id, "type": "function", "function": fn}
                else:
                    delta = {"index": call.index, "function": {"arguments": call.arguments}}
                yield chunk([choice(update.index, {"tool_calls": [delta]})])
            if update.finish_reason is not None:
                extra = {"stagelm": {"routing": [run.routing[update.index]]}} if want_routing else {}
                yield chunk([choice(update.index, {}, None, update.finish_reason)], **extra)
    except GenerationError as e:
        yield _sse(_error_payload(str(e)))
    if include_usage:
        yield _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": run.usage,
            }
        )
    yield "data: [DONE]\n\n"


def _legacy_logprobs(entries: list[dict[str, Any]], top: int) -> dict[str, Any]:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries] if top else None,
        "text_offset": offsets,
    }


@router.post(
    "/v1/completions",
    response_model=Completion,
    response_model_exclude_none=True,
    responses={**ERRORS, 200: {"content": STREAMED, "description": "The completion, or SSE chunks with stream=true"}},
    tags=["openai"],
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    """Plain text completion: the prompt is encoded after BOS and the model continues it until EOS."""
    state = server_state(request)
    served = state.model(body.model)
    stop = stop_strings(body.stop)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "stream=true takes one prompt", param="prompt")
    tokenizer = served.tokenizer
    encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    want_logprobs = body.logprobs is not None
    runs: list[GenerationRun] = []
    try:
        for ids in encoded:
            params = sampling_params(
                served,
                len(ids),
                body.max_tokens,
                body.temperature,
                body.top_p,
                body.top_k,
                body.seed,
                (tokenizer.eos_id,),
                logprobs=want_logprobs,
                top_logprobs=body.logprobs or 0,
                min_tokens=body.min_tokens,
            )
            runs.append(start_run(state, served, ids, params, body.n, stop, tool_calls=False))
    except ApiError:
        for run in runs:
            run.cancel()
        raise
    created, completion_id = int(time.time()), _completion_id("cmpl")
    echo = {i: prompts[i] if body.echo else "" for i in range(len(prompts))}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_stream(runs[0], served.name, completion_id, created, echo[0], body.logprobs, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    try:
        for p, run in enumerate(runs):
            for j, a in enumerate(await run.collect()):
                logprobs = _legacy_logprobs(a.logprob_entries, body.logprobs or 0) if want_logprobs else None
                choices.append(
                    {
                        "index": p * body.n + j,
                        "text": echo[p] + a.content,
                        "logprobs": logprobs,
                        "finish_reason": a.finish_reason,
                    }
                )
            for key, value in run.usage.items():
                usage[key] += value
    except GenerationError as e:
        raise ApiError(500, str(e), "server_error") from None
    finally:
        for run in runs:
            run.cancel()
    response: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": served.name,
        "choices": choices,
        "usage": usage,
    }
    if body.stagelm and body.stagelm.routing:
        response["stagelm"] = {"routing": [r for run in runs for r in run.routing]}
    return response


async def _completion_stream(
    run: GenerationRun, model: str, completion_id: str, created: int, echo: str, top: int | None, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    if echo:
        for index in range(run.n):
            yield chunk(index, echo)
    try:
        async for update in run.updates():
            d = update.delta
            logprobs = _legacy_logprobs(d.logprobs, top or 0) if top is not None and d.logprobs else None
            if d.content or logprobs:
                yield chunk(update.index, d.content, logprobs)
            if update.finish_reason is not None:
                yield chunk(update.index, "", None, update.finish_reason)
    except GenerationError as e:
        yield _sse(_error_payload(str(e)))
    if include_usage:
        payload = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
        yield _sse({**payload, "choices": [], "usage": run.usage})
    yield "data: [DONE]\n\n"


@router.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]}, tags=["openai"])
async def list_models(request: Request) -> ModelList:
    state = server_state(request)
    cards = [
        ModelCard(id=name, created=m.created, stage=m.stage, context_length=m.context_length)
        for name, m in state.models.items()
    ]
    return ModelList(data=cards)


@router.get("/v1/models/{model}", response_model=ModelCard, responses={401: ERRORS[401], 404: ERRORS[404]})
async def get_model(model: str, request: Request) -> ModelCard:
    served = server_state(request).model(model)
    return ModelCard(id=served.name, created=served.created, stage=served.stage, context_length=served.context_length)


@router.get("/health", response_model=Health, tags=["server"])
async def health(request: Request) -> Health:
    """Liveness, without the API key."""
    return Health(status="ok", models=list(server_state(request).models))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}, 401: ERRORS[401]},
    tags=["server"],
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
