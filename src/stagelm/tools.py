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
        "description": "Evaluate an arithmetic expression with integers, + - * and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example '4821 * 37'"}},
            "required": ["expression"],
        },
    },
}

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def evaluate_arithmetic(expression: str) -> str:
    """Exact integer arithmetic with + - * // % and parentheses, parsed (never eval'd); ValueError otherwise."""
    if len(expression) > 200:
        raise ValueError("expression too long")

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
                raise ValueError("division by zero")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        raise ValueError(f"unsupported expression: {expression!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"unsupported expression: {expression!r}") from e
    return str(value(tree.body))


def calculator(expression: str) -> str:
    """The tool's reply: the value as text ("178377"), or "error: ..." that the model can read."""
    try:
        return evaluate_arithmetic(expression)
    except ValueError as e:
        return f"error: {e}"


def run_tool_call(call: dict[str, Any]) -> str:
    """Execute one OpenAI-shaped tool call with the built-in tools; unknown tools and bad arguments are errors
    returned to the model as text, never raised."""
    fn = call.get("function", {}) if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return "error: a tool call is an object with a 'function' object"
    if fn.get("name") != "calculator":
        return f"error: unknown tool {fn.get('name')!r}"
    raw = fn.get("arguments") or "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return "error: arguments are not JSON"
    if not isinstance(arguments, dict):
        return "error: arguments must be a JSON object"
    return calculator(str(arguments.get("expression", "")))
