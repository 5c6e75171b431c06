"""The chat page (`GET /`, one self-contained HTML file: no external assets, it works offline) and the route
that runs the built-in tools for it (`POST /v1/tools/run`), so the page can complete a tool round trip."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from stagelm.serve.schemas import ErrorResponse, ToolRunRequest, ToolRunResult
from stagelm.tools import run_tool_call

router = APIRouter()


@router.get("/", response_class=HTMLResponse, tags=["page"])
async def chat_page() -> HTMLResponse:
    html = resources.files("stagelm.serve").joinpath("chat_page.html").read_text(encoding="utf-8")
    return HTMLResponse(html)


@router.post(
    "/v1/tools/run",
    response_model=ToolRunResult,
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}},
    tags=["page"],
)
async def run_tool(body: ToolRunRequest) -> ToolRunResult:
    """Run a built-in tool (the calculator) on a tool call's arguments; errors come back as the tool's text."""
    import json

    arguments = body.arguments if isinstance(body.arguments, str) else json.dumps(body.arguments)
    content = run_tool_call({"function": {"name": body.name, "arguments": arguments}})
    return ToolRunResult(name=body.name, content=content)
