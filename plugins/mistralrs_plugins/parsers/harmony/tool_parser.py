"""Harmony tool calls (GPT-OSS), as the `harmony` reasoning parser hands them on:
``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{ARGS}<|call|>``. The
``functions.`` namespace is dropped from the name; the closing ``<|call|>`` is an end-of-turn
token, so it may be missing at the end of the output."""

from __future__ import annotations

from mistralrs.parsing import Cursor, ToolCallParser
from mistralrs_plugins.parsers.harmony.parser import CALL_END, CHANNEL, MESSAGE, call_header


class HarmonyToolParser(ToolCallParser):
    name = "harmony"
    start_markers = (f"{CHANNEL}commentary to=",)
    bare_json_at_start = False

    def render_call(self, name: str, arguments: str) -> str:
        return f"{call_header('functions.' + name)}{arguments}{CALL_END}"

    def parse_region(self, marker: str, cur: Cursor) -> list[tuple[str, str]]:
        name = cur.name().removeprefix("functions.")
        cur.ws()
        if cur.match("<|constrain|>"):
            cur.name()
        cur.ws()
        cur.expect(MESSAGE)
        arguments = cur.arguments()
        cur.ws()
        if not cur.match(CALL_END):
            cur.expect_end()
        return [(name, arguments)]
