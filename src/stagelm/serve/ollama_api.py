"""Ollama-compatible routes: /api/chat, /api/generate, /api/tags (and /api/version), in the shapes the official
`ollama` Python client reads.

Differences from the OpenAI routes that clients rely on: `stream` defaults to true and streams NDJSON (one JSON
object a line), tool-call arguments are objects rather than JSON strings, tool calls carry no ids (a `tool`
message answers the oldest unanswered call), sampling settings come in `options`, durations are nanoseconds,
and errors are `{"error": "..."}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from stagelm.serve.app import ApiError
from stagelm.serve.conversation import RequestError, build_prompt
from stagelm.serve.openai_api import sampling_params, server_state, start_run, stop_token_ids
from stagelm.serve.registry import ServedModel
from stagelm.serve.runs import GenerationError, GenerationRun
from stagelm.serve.schemas import (
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaErrorResponse,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaModel,
    OllamaModelDetails,
    OllamaOptions,
    OllamaTags,
    error_responses,
)

router = APIRouter(prefix="/api", tags=["ollama"])

ERRORS = error_responses(OllamaErrorResponse)
NDJSON = {"application/x-ndjson": {"schema": {"type": "string"}}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":")) + "\n"


def _options_params(served: ServedModel, options: OllamaOptions | None, prompt_tokens: int, stops, prompt=None):
    options = options or OllamaOptions()
    # num_predict: -1 (Ollama's "no limit") and -2 ("fill the context") both mean up to the context here
    num_predict = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    if options.num_predict is not None and options.num_predict == 0:
        raise ApiError(400, "options.num_predict must not be 0", param="options.num_predict")
    if num_predict is None:
        num_predict = max(1, served.context_length - prompt_tokens)
        num_predict = min(num_predict, served.limits.max_tokens)
    return sampling_params(
        served,
        prompt_tokens,
        num_predict,
        options.temperature,
        options.top_p,
        options.top_k,
        options.seed,
        stops,
        prompt,
        max_tokens_param="options.num_predict",
    )


def _arguments_object(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)
    return value if isinstance(value, dict) else {"value": value}


def _final_fields(run: GenerationRun, model: str, done_reason: str) -> dict[str, Any]:
    finished = run.finished_at or time.perf_counter()
    first = run.first_token_at or finished
    ns = 1_000_000_000
    return {
        "model": model,
        "created_at": _now(),
        "done": True,
        "done_reason": done_reason,
        "total_duration": int((finished - run.accepted_at) * ns),
        "load_duration": 0,
        "prompt_eval_count": run.prompt_tokens,
        "prompt_eval_duration": int((first - run.accepted_at) * ns),
        "eval_count": sum(run.completion_tokens),
        "eval_duration": int((finished - first) * ns),
    }


def _done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


@router.post(
    "/chat",
    response_model=OllamaChatResponse,
    responses={**ERRORS, 200: {"content": NDJSON, "description": "The reply, or NDJSON chunks with stream=true"}},
)
async def chat(body: OllamaChatRequest, request: Request) -> Any:
    """Chat; `message.tool_calls[].function.arguments` are objects."""
    state = server_state(request)
    served = state.model(body.model, ollama=True)
    messages = [m.model_dump(exclude_none=True) for m in body.messages or []]
    if not messages:
        raise ApiError(400, "messages must contain at least one message", param="messages")
    try:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        prompt = build_prompt(served.tokenizer, messages, tools)
    except RequestError as e:
        raise ApiError(400, e.message, param=e.param) from None
    stops = list((body.options.stop if body.options else None) or [])
    params = _options_params(served, body.options, len(prompt.ids), stop_token_ids(served), prompt)
    run = start_run(state, served, prompt.ids, params, 1, stops)
    if body.stream:
        return StreamingResponse(_chat_stream(run, served.name), media_type="application/x-ndjson")
    try:
        (assembler,) = await run.collect()
    except GenerationError as e:
        raise ApiError(500, str(e), "server_error") from None
    message: dict[str, Any] = {"role": "assistant", "content": assembler.content}
    if assembler.tool_calls:
        message["tool_calls"] = [
            {"function": {"name": c["function"]["name"], "arguments": _arguments_object(c["function"]["arguments"])}}
            for c in assembler.tool_calls
        ]
    return {**_final_fields(run, served.name, _done_reason(assembler.finish_reason)), "message": message}


async def _chat_stream(run: GenerationRun, model: str) -> AsyncIterator[str]:
    try:
        async for update in run.updates():
            if update.delta.content:
                message = {"role": "assistant", "content": update.delta.content}
                yield _line({"model": model, "created_at": _now(), "message": message, "done": False})
            if update.finish_reason is None:
                continue
            calls = run.assemblers[update.index].tool_calls
            if calls:
                tool_calls = [
                    {
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _arguments_object(c["function"]["arguments"]),
                        }
                    }
                    for c in calls
                ]
                message = {"role": "assistant", "content": "", "tool_calls": tool_calls}
                yield _line({"model": model, "created_at": _now(), "message": message, "done": False})
            final = _final_fields(run, model, _done_reason(update.finish_reason))
            yield _line({**final, "message": {"role": "assistant", "content": ""}})
    except GenerationError as e:
        yield _line({"error": str(e)})


@router.post(
    "/generate",
    response_model=OllamaGenerateResponse,
    responses={**ERRORS, 200: {"content": NDJSON, "description": "The text, or NDJSON chunks with stream=true"}},
)
async def generate(body: OllamaGenerateRequest, request: Request) -> Any:
    """Complete a prompt: as a user turn in the chat format, or as plain text after BOS with raw=true."""
    state = server_state(request)
    served = state.model(body.model, ollama=True)
    tokenizer = served.tokenizer
    if not body.prompt:  # Ollama answers an empty prompt by loading the model; it is always loaded here
        return {"model": served.name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    if body.raw:
        ids, stops = [tokenizer.bos_id, *tokenizer.encode(body.prompt)], (tokenizer.eos_id,)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}
        ]
        ids, stops = build_prompt(tokenizer, messages, None, "none").ids, stop_token_ids(served)
    stop_strings = list((body.options.stop if body.options else None) or [])
    params = _options_params(served, body.options, len(ids), stops)
    run = start_run(state, served, ids, params, 1, stop_strings, tool_calls=False)
    if body.stream:
        return StreamingResponse(_generate_stream(run, served.name), media_type="application/x-ndjson")
    try:
        (assembler,) = await run.collect()
    except GenerationError as e:
        raise ApiError(500, str(e), "server_error") from None
    return {**_final_fields(run, served.name, _done_reason(assembler.finish_reason)), "response": assembler.content}


async def _generate_stream(run: GenerationRun, model: str) -> AsyncIterator[str]:
    try:
        async for update in run.updates():
            if update.delta.content:
                yield _line({"model": model, "created_at": _now(), "response": update.delta.content, "done": False})
            if update.finish_reason is not None:
                yield _line({**_final_fields(run, model, _done_reason(update.finish_reason)), "response": ""})
    except GenerationError as e:
        yield _line({"error": str(e)})


@router.get("/tags", response_model=OllamaTags, responses={401: ERRORS[401]})
async def tags(request: Request) -> OllamaTags:
    """The served models."""
    models = []
    for name, m in server_state(request).models.items():
        modified = datetime.fromtimestamp(m.created, timezone.utc).isoformat().replace("+00:00", "Z")
        size = f"{m.model.num_params() / 1e6:.1f}M"
        details = OllamaModelDetails(parameter_size=size)
        models.append(
            OllamaModel(
                name=name, model=name, modified_at=modified, size=m.size_bytes, digest=m.digest, details=details
            )
        )
    return OllamaTags(models=models)


@router.get("/version", responses={401: ERRORS[401]})
async def version() -> dict[str, str]:
    from stagelm import __version__

    return {"version": __version__}
