"""mistralrs-calculator: a tool source with one tool, `calculate`, that evaluates arithmetic
exactly (integers and fractions stay exact), so a model never has to do sums in its head.

Registered through the public `register_tool_sources` hook; the engine's tool loop, the MCP
server and `mistralrs tools call calculate '{"expression": "2*(3+4)"}'` all reach it.
"""

from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction
from typing import Any

from mistralrs import hookimpl
from mistralrs.specs import ToolSourceSpec

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 10_000


class CalculatorError(ValueError):
    pass


def evaluate(expression: str) -> Any:
    """Evaluate an arithmetic expression safely (no names, attributes or calls beyond a few math functions)."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {exc.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(node.value) if isinstance(node.value, int) else node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError("exponent too large")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        args = [_eval(a) for a in node.args]
        return _FUNCTIONS[node.func.id](*[float(a) if node.func.id == "sqrt" else a for a in args])
    raise CalculatorError(f"unsupported syntax: {ast.unparse(node)}")


def format_number(value: Any) -> str:
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else repr(float(value))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class CalculatorTools:
    def list_tools(self) -> list[dict[str, Any]]:
        return [{
            "type": "function",
            "function": {
                "name": "calculate",
                "description": "Evaluate an arithmetic expression exactly (+ - * / // % **, sqrt, abs, round, min, max, pi, e).",
                "parameters": {
                    "type": "object",
                    "properties": {"expression": {"type": "string", "description": "e.g. (17 + 25) * 3"}},
                    "required": ["expression"],
                },
            },
        }]

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        if name != "calculate":
            raise KeyError(name)
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            return "error: pass the expression as a string in 'expression'"
        try:
            return format_number(evaluate(expression))
        except CalculatorError as exc:
            return f"error: {exc}"


@hookimpl
def register_tool_sources(register):
    register(ToolSourceSpec(
        name="calculator",
        factory=CalculatorTools,
        description="exact arithmetic (mistralrs-calculator)",
    ))
