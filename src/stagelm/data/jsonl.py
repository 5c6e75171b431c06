"""Reading JSONL files with errors that name the file and line (shared by every data module)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stagelm.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, record) for each non-blank line; `where` is "file:line" for error messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file does not exist: {path}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
            yield where, record


def check_renders(messages: list[Any], tools: Any, where: str, field: str) -> None:
    """A DataError naming file:line and the field when the chat format cannot render a record's messages (unknown
    role, a malformed tool call, content that is not text): caught when the file is read, not mid-training."""
    from stagelm.chat import ChatFormatError, render

    try:
        render(messages, tools=tools)
    except ChatFormatError as e:
        raise DataError(f"{where}: '{field}': {e}") from None


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
