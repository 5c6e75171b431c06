"""The FastAPI application: shared state, API-key check, error shapes, request metrics, and the routes of both
APIs (`openai_api`, `ollama_api`) and the chat page.

Errors: OpenAI's `{"error": {"message", "type", "param", "code"}}` everywhere but under /api, where Ollama's
`{"error": "..."}` is what its clients read; invalid requests are 400 (FastAPI's default 422 is not what
either API's clients expect).

The API key, when set, is required (`Authorization: Bearer KEY`) on every route except /health and the chat
page itself (a browser cannot send a header when it opens a page; the page sends the key on every API call).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from stagelm.serve.metrics import ServerMetrics
from stagelm.serve.registry import ServedModel

PUBLIC_PATHS = {"/health", "/"}


class ApiError(Exception):
    """An error with an HTTP status, in the API's own shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})


@dataclass
class ServerState:
    models: dict[str, ServedModel]
    metrics: ServerMetrics
    api_key: str | None = None

    def model(self, name: str, ollama: bool = False) -> ServedModel:
        """The served model called `name` (Ollama clients may add `:latest`); 404 otherwise."""
        served = self.models.get(name)
        if served is None and ollama and name.endswith(":latest"):
            served = self.models.get(name[: -len(":latest")])
        if served is None:
            raise ApiError(
                404,
                f"The model {name!r} does not exist; served models: {', '.join(self.models)}",
                param="model",
                code="model_not_found",
            )
        return served


def error_response(request: Request, error: ApiError) -> JSONResponse:
    if request.url.path.startswith("/api/"):
        body: dict = {"error": error.message}
    else:
        body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def create_app(models: dict[str, ServedModel], api_key: str | None = None) -> FastAPI:
    """The server for already-loaded models; their engines are stopped when the app shuts down."""
    from stagelm.serve import ollama_api, openai_api, page

    metrics = ServerMetrics(lambda: [(name, *m.engine.load) for name, m in models.items()])
    state = ServerState(models, metrics, api_key or None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for served in models.values():
            served.engine.stop()

    app = FastAPI(
        title="stagelm",
        version="0.1.0",
        description="OpenAI- and Ollama-compatible API for stagelm checkpoints, with tool calls and streaming.",
        lifespan=lifespan,
    )
    app.state.server = state

    @app.middleware("http")
    async def authenticate_and_count(request: Request, call_next) -> Response:
        started = time.perf_counter()
        path = request.url.path
        if state.api_key and path not in PUBLIC_PATHS:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), state.api_key):
                message = "Incorrect API key provided" if header else "Missing API key: send Authorization: Bearer KEY"
                response = error_response(request, ApiError(401, message, code="invalid_api_key"))
                metrics.requests.labels("unauthenticated", "401").inc()
                return response
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        metrics.requests.labels(template, str(response.status_code)).inc()
        metrics.http_latency.labels(template).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request, ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(page.router)
    return app
