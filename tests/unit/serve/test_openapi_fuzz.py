"""Schemathesis against `/openapi.json`, in-process (ASGI): generated requests for every route, schema-valid and
schema-breaking, must never get a 5xx, and every response must match the documented status codes, content types,
headers and schemas.

Hypothesis drives each operation directly (schemathesis' own pytest plugin does not load under this pytest)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.unit.serve.conftest import make_app, random_checkpoint  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    # a 64-token context and short default replies keep each generated request to milliseconds
    ckpt = random_checkpoint(tmp_path_factory.mktemp("fuzz") / "sft.ckpt", max_seq_len=64)
    app = make_app(ckpt, max_tokens=8, max_running=4, max_waiting=64)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_responses_match_the_schema(api_schema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/tags"} <= paths
    calls, exercised = 0, set()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:
            nonlocal calls
            case.call_and_validate(checks=CHECKS)
            calls += 1
            exercised.add(case.operation.path)

        try:
            check()
        except Unsatisfiable:
            # no request breaks the schema of a route without inputs (GET /health): nothing to send
            assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.path
    posts = {op.path for op in operations if op.method.upper() == "POST"}
    assert posts <= exercised and calls >= EXAMPLES
