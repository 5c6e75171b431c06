"""Tools a chat model can call. The built-in world teaches one: `calculator`, evaluated safely (no eval())."""

from __future__ import annotations

import ast
import json
import operator
from typing import Any

CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 4821 * 37"}},
            "required": ["expression"],
        },
    },
}

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / // % are allowed")


def calculator(expression: str) -> str:
    """The value of an arithmetic expression as text ("178377"), or "error: ..." for anything else."""
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError) as e:
        return f"error: {e}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def run_tool_call(call: dict[str, Any]) -> str:
    """Execute one OpenAI-shaped tool call with the built-in tools; unknown tools and bad arguments are errors
    returned to the model as text, never raised."""
    fn = call.get("function", {})
    if fn.get("name") != "calculator":
        return f"error: unknown tool {fn.get('name')!r}"
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        return "error: arguments are not JSON"
    return calculator(str(arguments.get("expression", "")))
