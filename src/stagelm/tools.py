"""Tools a chat model can call. The built-in world teaches two: `calculator` (exact integer arithmetic, evaluated
safely, no eval()) and `convert` (units), so choosing the tool is part of the decision."""

from __future__ import annotations

import ast
import json
import operator
from typing import Any

CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        # descriptions are short: they are rendered into every prompt that offers the tool (one token a character)
        "description": "exact integer arithmetic",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example '4821 * 37'"}},
            "required": ["expression"],
        },
    },
}

CONVERTER_SCHEMA = {
    "type": "function",
    "function": {
        "name": "convert",
        "description": "unit conversion",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "from_unit": {"type": "string", "description": "for example 'km'"},
                "to_unit": {"type": "string", "description": "for example 'm'"},
            },
            "required": ["value", "from_unit", "to_unit"],
        },
    },
}
# (from, to) -> factor; the other direction is exact when the value divides
UNIT_FACTORS = {
    ("km", "m"): 1000,
    ("m", "cm"): 100,
    ("kg", "g"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
}
BUILTIN_TOOL_SCHEMAS = [CALCULATOR_SCHEMA, CONVERTER_SCHEMA]

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


def convert(value: Any, from_unit: Any, to_unit: Any) -> str:
    """The converter's reply: the converted whole number as text ("5000"), or "error: ..." the model can read."""
    if type(value) is not int:
        return "error: value must be a whole number"
    if factor := UNIT_FACTORS.get((from_unit, to_unit)):
        return str(value * factor)
    if (factor := UNIT_FACTORS.get((to_unit, from_unit))) and value % factor == 0:
        return str(value // factor)
    return f"error: cannot convert {from_unit} to {to_unit}"


def run_tool_call(call: dict[str, Any]) -> str:
    """Execute one OpenAI-shaped tool call with the built-in tools; unknown tools and bad arguments are errors
    returned to the model as text, never raised."""
    fn = call.get("function", {}) if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return "error: a tool call is an object with a 'function' object"
    if fn.get("name") not in ("calculator", "convert"):
        return f"error: unknown tool {fn.get('name')!r}"
    raw = fn.get("arguments") or "{}"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return "error: arguments are not JSON"
    if not isinstance(arguments, dict):
        return "error: arguments must be a JSON object"
    if fn["name"] == "convert":
        return convert(arguments.get("value"), arguments.get("from_unit"), arguments.get("to_unit"))
    return calculator(str(arguments.get("expression", "")))
