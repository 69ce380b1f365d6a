"""The output pipeline of one choice: reasoning parser -> tool-call parser -> call filter, split
into reasoning, content, client-visible tool calls and the server-side call the tool loop runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs

from mistralrs.parsed_calls import ToolCall, ToolCallDelta

log = logging.getLogger("mistralrs.tools")


@attrs.frozen
class ParsedChoice:
    """One choice's output, split: `calls` are the client-visible tool calls (OpenAI
    shape, ids `call-<uuid>`), `server_call` the server-side call the tool loop runs."""

    content: str
    reasoning: str | None
    calls: tuple[Any, ...] = ()
    server_call: Any = None


class OutputPipeline:
    """Streaming split of one choice's text into reasoning, content and tool calls.

    `feed(text)` / `finish()` return `(reasoning, content, tool_call_deltas)`; the deltas
    are `parsing.ToolCallDelta`s renumbered over the client-visible calls only. A call to
    an undeclared tool is dropped (as mistral.rs does). The first call of the output is
    kept back as `server_call` when it is a server-side tool (and then every later call of
    the output is dropped: the tool loop continues after it)."""

    def __init__(self, *, reasoning: Any = None, tools: Any = None, client_names: Sequence[str] = (),
                 server_names: Sequence[str] = ()) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.client_names = frozenset(client_names)
        self.server_names = frozenset(server_names)
        self.calls: list[Any] = []
        self.server_call: Any = None
        self._seen_call = False
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def _filter(self, deltas: Sequence[Any]) -> list[Any]:
        out = []
        for d in deltas:
            if self.server_call is not None:
                continue  # the loop continues after the server-side call: the rest is dropped
            if d.name in self.server_names and not self._seen_call:
                self.server_call = ToolCall(id=d.id or "", name=d.name, arguments=d.arguments)
            elif d.name in self.client_names:
                index = len(self.calls)
                self.calls.append(ToolCall(id=d.id or "", name=d.name, arguments=d.arguments))
                out.append(ToolCallDelta(index, d.id, d.name, d.arguments))
            else:
                log.info("dropping a call to the undeclared tool %r", d.name)
                continue
            self._seen_call = True
        return out

    def _run(self, text: str | None) -> tuple[str, str, list[Any]]:
        final = text is None
        if self.reasoning is not None:
            r, c = self.reasoning.finish() if final else self.reasoning.feed(text)
        else:
            r, c = "", ("" if final else text)
        deltas: list[Any] = []
        if self.tools is not None:
            content, deltas = self.tools.feed(c) if c else ("", [])
            if final:
                tail, more = self.tools.finish()
                content, deltas = content + tail, deltas + more
            c = content
        self._reasoning_parts.append(r)
        self._content_parts.append(c)
        return r, c, self._filter(deltas)

    def feed(self, text: str) -> tuple[str, str, list[Any]]:
        return self._run(text)

    def finish(self) -> tuple[str, str, list[Any]]:
        return self._run(None)

    def result(self) -> ParsedChoice:
        reasoning = "".join(self._reasoning_parts)
        return ParsedChoice("".join(self._content_parts), reasoning or None, tuple(self.calls), self.server_call)

    def parse(self, text: str) -> ParsedChoice:
        self.feed(text)
        self.finish()
        return self.result()
