"""Pydantic models of the requests and responses of both APIs, so `/openapi.json` documents every route.

Request models accept (and ignore) fields this server does not use, as both APIs' clients send many; fields it
does use are validated here, so a bad value is a 400 that names the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20


class Lenient(BaseModel):
    """Accepts fields it does not declare: clients of both APIs send options this server has no use for."""

    model_config = ConfigDict(extra="allow")


# --- errors ------------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every route outside /api."""

    error: ErrorBody


class OllamaErrorResponse(BaseModel):
    """Ollama's error shape, used by the /api routes."""

    error: str


# --- OpenAI: shared pieces ---------------------------------------------------------------------------------------
class FunctionCall(Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


def error_responses(error_model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The documented error statuses of every generating route (for `/openapi.json`), in one API's error shape."""
    return {
        status: {"model": error_model, "description": description}
        for status, description in {
            400: "Invalid request",
            401: "Missing or wrong API key",
            404: "Unknown model",
            429: "Queue full; see Retry-After",
            500: "Generation failed",
        }.items()
    }


class ToolCall(Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Lenient):
    include_usage: bool = False


class StagelmOptions(BaseModel):
    """The `stagelm` extension: routing=true adds the request's expert routing to the response."""

    routing: bool = False


class SamplingFields(Lenient):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="stagelm extension: sample among the k most likely tokens")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    min_tokens: int = Field(0, ge=0, description="stagelm extension (as in vLLM): no stop token before this many")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the reply")
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stagelm: StagelmOptions | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class StagelmExtension(BaseModel):
    """Per MoE layer (by layer index): tokens per expert, their shares, and the mean router entropy (nats)."""

    routing: list[dict[str, dict[str, Any]]] | None = Field(None, description="one entry per choice")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    stagelm: StagelmExtension | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    stagelm: StagelmExtension | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stagelm"
    stage: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]


class ToolRunRequest(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolRunResult(BaseModel):
    name: str
    content: str


# --- Ollama ------------------------------------------------------------------------------------------------------
class OllamaOptions(Lenient):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    num_predict: int | None = Field(None, description="tokens to generate; -1 or absent: up to the context")
    stop: list[str] | None = None


class OllamaFunctionCall(Lenient):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(Lenient):
    function: OllamaFunctionCall


class OllamaMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class OllamaChatRequest(Lenient):
    model: str
    messages: list[OllamaMessage] | None = None
    tools: list[Tool] | None = None
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaGenerateRequest(Lenient):
    model: str
    prompt: str | None = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None


class OllamaResponseFunction(BaseModel):
    name: str
    arguments: dict[str, Any]


class OllamaResponseToolCall(BaseModel):
    function: OllamaResponseFunction


class OllamaResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaResponseToolCall] | None = None


class OllamaFinal(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(OllamaFinal):
    message: OllamaResponseMessage


class OllamaGenerateResponse(OllamaFinal):
    response: str


class OllamaModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "stagelm"
    family: str = "stagelm"
    families: list[str] = ["stagelm"]
    parameter_size: str
    quantization_level: str = "F32"


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]
