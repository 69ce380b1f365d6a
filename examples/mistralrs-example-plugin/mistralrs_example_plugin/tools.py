"""The `units` tool source: one tool, `convert_units`, for lengths.

A tool source is any object with `list_tools()` (OpenAI function tools) and
`call(name, arguments) -> str`. The engine's tool loop (`--enable-tool-sources`,
`Runner(enable_tool_sources=...)`) and `mistralrs tools call` reach it.
"""

from __future__ import annotations

from typing import Any

METERS = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "mi": 1609.344}


class UnitTools:
    def list_tools(self) -> list[dict[str, Any]]:
        unit = {"enum": sorted(METERS)}
        return [{"type": "function", "function": {
            "name": "convert_units",
            "description": "Convert a length between units (mm, cm, m, km, in, ft, mi).",
            "parameters": {
                "type": "object",
                "properties": {
                    "value": {"type": "number", "minimum": -1e9, "maximum": 1e9},
                    "from_unit": unit,
                    "to_unit": unit,
                },
                "required": ["value", "from_unit", "to_unit"],
            },
        }}]

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        if name != "convert_units":
            raise KeyError(name)
        # The model wrote these arguments: answer mistakes with a message it can read.
        value, src, dst = arguments.get("value"), arguments.get("from_unit"), arguments.get("to_unit")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "error: 'value' must be a number"
        if src not in METERS or dst not in METERS:
            return f"error: units must be among {', '.join(sorted(METERS))}"
        return f"{value:g} {src} = {value * METERS[src] / METERS[dst]:.6g} {dst}"
