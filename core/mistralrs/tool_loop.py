"""The server-side tool loop over engine requests: `ToolLoop` is a request handle over the rounds
of a chat request; when a round ends in a call to a server-side tool, the tool runs, the plan
advances and the next round is submitted, with a `RoundBoundary` event in between."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, AsyncIterator

import attrs

from mistralrs.chat_plan import ChatPlan


@attrs.frozen
class RoundBoundary:
    """Between two rounds of the tool loop: the server-side call of choice `index` ran."""

    index: int
    record: Any


def _sum_usage(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return attrs.evolve(
        b,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        time_to_first_token=a.time_to_first_token,
        prompt_seconds=(a.prompt_seconds or 0.0) + (b.prompt_seconds or 0.0),
        completion_seconds=(a.completion_seconds or 0.0) + (b.completion_seconds or 0.0),
        total_seconds=a.total_seconds + b.total_seconds,
    )


class ToolLoop:
    """A request handle over the rounds of the tool loop: iterate (or async-iterate) it like
    an engine handle. Events are the engine's, except that a round ending in a server-side
    call yields a `RoundBoundary` instead of its `ChoiceFinished` / `RequestDone`, and the
    final `RequestDone` carries the usage summed over all rounds. `records` lists the
    executed calls. The first round is submitted at once (a bad request raises here)."""

    def __init__(self, plan: ChatPlan, submit: Callable[[Any], Any]) -> None:
        self.plan = plan
        self.submit = submit
        self.handle = submit(plan.request)
        self.request = plan.request
        self.id = getattr(self.handle, "id", None)
        self.cancelled = False
        self._usage: Any = None
        self._pending: Any = None  # (parsed choice, the swallowed ChoiceFinished)

    @property
    def done(self) -> bool:
        return bool(getattr(self.handle, "done", True)) and self._pending is None

    @property
    def records(self) -> list[Any]:
        return self.plan.records

    def cancel(self) -> None:
        self.cancelled = True
        self.handle.cancel()

    def _swallow(self, event: Any) -> bool:
        """A ChoiceFinished whose output ends in a server-side call: hold it back."""
        if type(event).__name__ == "ChoiceFinished" and event.index == 0 and not self.cancelled \
                and event.finish_reason in ("stop", "length") and self.plan.server_names:
            parsed = self.plan.parse(event.text)
            if parsed.server_call is not None:
                self._pending = (parsed, event)
                return True
        return False

    def _round_end(self, event: Any) -> list[Any] | None:
        """At a RequestDone: None to run the pending call and go on, else the final events."""
        self._usage = _sum_usage(self._usage, event.usage)
        if self._pending is not None and not self.cancelled:
            return None
        held = [self._pending[1]] if self._pending is not None else []
        self._pending = None
        return held + [attrs.evolve(event, usage=self._usage)]

    def __iter__(self) -> Iterator[Any]:
        while True:
            final: list[Any] | None = []
            for event in self.handle:
                if self._swallow(event):
                    continue
                if type(event).__name__ == "RequestDone":
                    final = self._round_end(event)
                    break
                yield event
            if final is not None:
                yield from final
                return
            parsed = self._pending[0]
            call = parsed.server_call
            result = self.plan.config.call(call.name, call.arguments)
            self._pending = None
            record = self.plan.advance(parsed, result)
            self.handle = self.submit(self.plan.request)
            self.request = self.plan.request
            yield RoundBoundary(0, record)

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                final: list[Any] | None = []
                async for event in self.handle:
                    if self._swallow(event):
                        continue
                    if type(event).__name__ == "RequestDone":
                        final = self._round_end(event)
                        break
                    yield event
                if final is not None:
                    for event in final:
                        yield event
                    return
                parsed = self._pending[0]
                call = parsed.server_call
                result = await asyncio.to_thread(self.plan.config.call, call.name, call.arguments)
                if self.cancelled:
                    held, self._pending = self._pending[1], None
                    yield attrs.evolve(held, finish_reason="canceled")
                    yield _cancelled_done(held, self._usage)
                    return
                self._pending = None
                record = await asyncio.to_thread(self.plan.advance, parsed, result)
                self.handle = self.submit(self.plan.request)
                self.request = self.plan.request
                yield RoundBoundary(0, record)
        finally:
            if not getattr(self.handle, "done", True):
                self.handle.cancel()


def _cancelled_done(choice: Any, usage: Any) -> Any:
    from mistralrs.engine.engine import RequestDone

    return RequestDone(usage, (attrs.evolve(choice, finish_reason="canceled"),))
