"""What flows in and out of the engine: a `GenerationRequest` goes in, and its
`RequestHandle` yields `TokenDelta`s, one `ChoiceFinished` per choice and a final
`RequestDone` (or `RequestFailed`), from any thread or asyncio loop."""

from __future__ import annotations

import asyncio
import itertools
import queue
from typing import Any, AsyncIterator, Iterator

import attrs

from mistralrs.errors import InvalidRequest


@attrs.define(kw_only=True)
class GenerationRequest:
    """What the engine needs to generate: already tokenized, already validated."""

    prompt_ids: list[int]
    sampling: Any  # mistralrs.engine.sampling.SamplingParams
    max_tokens: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    cache_key: Any = None  # anything else that changes the KV (adapters, images)
    grammar: Any = None  # constraints.GrammarSpec: output must match it (structured output, forced tool calls)
    mm: tuple[Any, ...] = ()  # multimodal.inputs.MmItem per image, in prompt order (vision models)
    compiled_grammar: Any = attrs.field(default=None, repr=False)  # set by Engine.submit
    id: str = attrs.field(factory=lambda: f"req-{next(_request_ids)}")

    @property
    def ranks_candidates(self) -> bool:
        """best_of > n: candidates are generated hidden and the best n returned at the end."""
        return self.best_of is not None and self.best_of > self.n

    @property
    def reports_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0 or self.sampling.wants_logprobs


_request_ids: Iterator[int] = itertools.count()


@attrs.frozen
class TokenDelta:
    """One generated token of a choice (`token_ids`) and the text it released: possibly "", when the
    detokenizer or a stop string holds text back (it comes with a later token, or at the end with no ids)."""

    index: int  # choice index
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...] = ()  # per token: (token_id, logprob, top: tuple[(id, logprob), ...])


@attrs.frozen
class ChoiceFinished:
    index: int
    finish_reason: str  # stop | length | canceled | error
    text: str
    token_ids: tuple[int, ...]
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    cumulative_logprob: float | None = None


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_to_first_token: float | None  # seconds
    prompt_seconds: float | None
    completion_seconds: float | None
    total_seconds: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prompt_tok_per_sec(self) -> float | None:
        if not self.prompt_seconds:
            return None
        return (self.prompt_tokens - self.cached_tokens) / self.prompt_seconds

    @property
    def completion_tok_per_sec(self) -> float | None:
        if not self.completion_seconds or self.completion_tokens <= 1:
            return None
        return (self.completion_tokens - 1) / self.completion_seconds


@attrs.frozen
class RequestDone:
    usage: Usage
    choices: tuple[ChoiceFinished, ...]


@attrs.frozen
class RequestFailed:
    error: BaseException


_END = (RequestDone, RequestFailed)


class RequestHandle:
    """The caller's side of a request: iterate (or async-iterate) its events, or cancel it."""

    def __init__(self, engine: Any, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> None:
        self.engine = engine
        self.request = request
        self.id = request.id
        self._loop = loop
        self._queue: Any = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.cancelled = False
        self.done = False

    def _put(self, event: Any) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._queue.put(event)

    def cancel(self) -> None:
        """Stop generating; blocks are freed within one engine step."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self.engine._cancel(self)

    def __iter__(self) -> Iterator[Any]:
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, _END):
                return

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                event = await self._queue.get()
                yield event
                if isinstance(event, _END):
                    return
        finally:
            if not self.done:
                self.cancel()

    def result(self) -> RequestDone:
        """Block until done; raise the engine's error if it failed."""
        for event in self:
            if isinstance(event, RequestDone):
                return event
            if isinstance(event, RequestFailed):
                raise event.error
        raise RuntimeError("request ended without a result")  # pragma: no cover

    async def aresult(self) -> RequestDone:
        async for event in self:
            if isinstance(event, RequestDone):
                return event
            if isinstance(event, RequestFailed):
                raise event.error
        raise RuntimeError("request ended without a result")  # pragma: no cover


class ContextTooLong(InvalidRequest):
    """The prompt does not fit the model's context (OpenAI `exceed_context_size_error`)."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int, *, at_least: bool = False) -> None:
        super().__init__(
            f"the prompt has {'at least ' if at_least else ''}{n_prompt_tokens} tokens but the context holds {n_ctx}; "
            "shorten the prompt or set truncate_sequence",
            "messages",
            code="exceed_context_size_error",
        )
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx
        self.at_least = at_least
