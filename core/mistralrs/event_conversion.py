"""Engine events -> OpenAI responses: `ChatStream` turns a request's events into chat-completion
(or completion) chunks, `collect` runs them to the end, and `chat_response` /
`completion_response` build the whole response from the final `RequestDone`."""

from __future__ import annotations

import time
from typing import Any

import attrs

from mistralrs.response_logprobs import LogprobCollector, completion_logprobs, logprobs_of, with_text
from mistralrs.response_types import (
    ROUND_SEPARATOR,
    ChatCompletionChunkResponse,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    Delta,
    ResponseMessage,
    ToolCallFunction,
    ToolCallResponse,
    Usage,
)


def now() -> int:
    return int(time.time())


class ChatStream:
    """Turns engine events into chat-completion chunks: role first, one finish per choice,
    usage last. Used by the Python API's iterators and the server's SSE stream alike.

    With logprobs, a token that released no text yet (an incomplete UTF-8 sequence, a possible
    stop string) is held back and sent with the chunk that carries its text, so the streamed
    `token` strings concatenate to the streamed content.

    With a `plan` (`tool_calling.ChatPlan`) whose outputs need parsing, each choice's text goes
    through its `OutputPipeline`: chunks carry `delta.reasoning_content`, `delta.content` and
    `delta.tool_calls` (`{index, id, type, function: {name, arguments}}`), the finish chunk
    says "tool_calls" when the choice called a tool, and a `RoundBoundary` of the tool loop
    flushes the choice's parsers and starts fresh ones for the next round. Logprobs then
    ride on the chunk of the event that produced them."""

    def __init__(self, tokenizer: Any, *, id: str, model: str, n: int, logprobs: bool, completion: bool = False,
                 plan: Any = None):
        self.tokenizer = tokenizer
        self.id, self.model, self.n, self.logprobs = id, model, n, logprobs
        self.completion = completion
        self.plan = plan if plan is not None and plan.active and not completion else None
        self.created = now()
        self.started: set[int] = set()
        # Completions: where each choice's text starts (after an echoed prompt), for text_offset.
        self.text_offset_start = 0
        self.text_offsets: dict[int, int] = {}
        self._pending: dict[int, list[Any]] = {}  # logprob entries whose text has not come out yet
        self._pipes: dict[int, Any] = {}
        self._called: set[int] = set()  # choices that returned tool calls
        self._wrote: set[int] = set()  # choices that streamed some content
        self._separate: set[int] = set()  # choices whose next content starts a new round

    def _logprobs(self, index: int, entries: list[Any]) -> Any:
        if not entries:
            return None
        if self.completion:
            return completion_logprobs(self.tokenizer, entries, offset=self.text_offsets.get(index, self.text_offset_start))
        return logprobs_of(self.tokenizer, entries)

    def _pipe(self, index: int) -> Any:
        pipe = self._pipes.get(index)
        if pipe is None:
            assert self.plan is not None
            pipe = self._pipes[index] = self.plan.new_pipeline()
        return pipe

    def chunk_for(self, event: Any) -> Any | None:
        """The last chunk `chunks_for(event)` gives, or None (compatibility)."""
        chunks = self.chunks_for(event)
        return chunks[-1] if chunks else None

    def chunks_for(self, event: Any) -> list[Any]:
        """The chunks one engine event (or tool-loop `RoundBoundary`) produces, in order.

        Choices start in index order (OpenAI's stream does, and its client's stream helper
        relies on it): before the first chunk of choice i, a role-only chunk is sent for every
        lower index that has not started yet (its text may be held back by a parser)."""
        chunks = self._chunks_for(event)
        if self.completion:
            return chunks
        if not chunks:
            # A choice's first tokens may release no text yet (an incomplete UTF-8 sequence, a parser holding
            # it back): its role chunk goes now, so the stream starts when generation does.
            i = getattr(event, "index", -1)
            if type(event).__name__ != "TokenDelta" or not isinstance(i, int) or i in self.started \
                    or not 0 <= i < self.n:
                return chunks
            chunks = [ChatCompletionChunkResponse(id=self.id, created=self.created, model=self.model,
                                                  choices=[ChunkChoice(index=i, delta=Delta(role=self._role(i)))])]
        index = chunks[0].choices[0].index if chunks[0].choices else 0
        late = [j for j in range(min(index, self.n)) if j not in self.started]
        head = [ChatCompletionChunkResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[ChunkChoice(index=j, delta=Delta(role=self._role(j)))]) for j in late]
        return head + chunks

    def _chunks_for(self, event: Any) -> list[Any]:
        from mistralrs.engine.engine import ChoiceFinished, RequestDone, TokenDelta

        if isinstance(event, TokenDelta):
            i = event.index
            entries: list[Any] = []
            if self.logprobs:
                pending = self._pending.pop(i, [])
                if event.logprobs:
                    entries = pending + with_text(event)
                    if not event.text and len(event.logprobs) == 1:
                        self._pending[i] = entries  # wait for the text this token will release
                        return []
                elif pending and event.text:
                    last = pending[-1]
                    entries = pending[:-1] + [(*last[:3], (last[3] if len(last) > 3 else "") + event.text)]
                else:
                    entries = pending
            if self.plan is not None:
                parsed = self._pipe(i).feed(event.text) if event.text else ("", "", [])
                return self._parsed_chunks(i, parsed, self._logprobs(i, entries))
            if not event.text and not entries:
                return []
            lp = self._logprobs(i, entries)
            if self.completion:
                self.text_offsets[i] = self.text_offsets.get(i, self.text_offset_start) + len(event.text)
            return [self._chunk(i, event.text, None, lp)]
        if isinstance(event, ChoiceFinished):
            lp = self._logprobs(event.index, self._pending.pop(event.index, [])) if self.logprobs else None
            if self.plan is None:
                return [self._chunk(event.index, "", event.finish_reason, lp)]
            out = self._parsed_chunks(event.index, self._pipe(event.index).finish(), lp)
            reason = event.finish_reason
            if event.index in self._called and reason in ("stop", "length"):
                reason = "tool_calls"
            last = self._chunk(event.index, "", reason, None)
            if event.index == 0 and self.plan.records:
                last.agentic_tool_calls = list(self.plan.records)
            return out + [last]
        if type(event).__name__ == "RoundBoundary":
            if self.plan is None:
                return []
            out = self._parsed_chunks(event.index, self._pipe(event.index).finish(), None)
            self._pipes[event.index] = self.plan.new_pipeline()
            if event.index in self._wrote:
                self._separate.add(event.index)
            return out
        if isinstance(event, RequestDone):
            return []
        return []

    def _parsed_chunks(self, index: int, parsed: tuple[str, str, list[Any]], lp: Any) -> list[Any]:
        reasoning, content, deltas = parsed
        if content:
            if index in self._separate:
                self._separate.discard(index)
                content = ROUND_SEPARATOR + content
            self._wrote.add(index)
        if not reasoning and not content and not deltas and lp is None:
            return []
        calls = None
        if deltas:
            self._called.add(index)
            calls = [{"index": d.index, "id": d.id, "type": "function",
                      "function": {"name": d.name, "arguments": d.arguments}} for d in deltas]
        delta = Delta(content=content or None, role=self._role(index), tool_calls=calls,
                      reasoning_content=reasoning or None)
        return [ChatCompletionChunkResponse(id=self.id, created=self.created, model=self.model,
                                            choices=[ChunkChoice(index=index, delta=delta, logprobs=lp)])]

    def _role(self, index: int) -> str | None:
        if index in self.started:
            return None
        self.started.add(index)
        return "assistant"

    def _chunk(self, index: int, text: str, finish: str | None, lp: Any) -> Any:
        if self.completion:
            return CompletionResponse(
                id=self.id, created=self.created, model=self.model,
                choices=[CompletionChoice(finish_reason=finish, index=index, text=text, logprobs=lp)],
            )
        return ChatCompletionChunkResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[ChunkChoice(index=index, delta=Delta(content=text if text or finish is None else None,
                                                          role=self._role(index)),
                                 finish_reason=finish, logprobs=lp)],
        )

    def usage_chunk(self, done: Any) -> Any:
        usage = Usage.from_engine(done.usage)
        if self.completion:
            return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)
        return ChatCompletionChunkResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


def message_for(plan: Any, text: str) -> tuple[ResponseMessage, bool]:
    """The assistant message of one choice's text (parsed with `plan` when it needs it), and
    whether it calls tools."""
    if plan is None or not plan.active:
        return ResponseMessage(content=text), False
    parsed = plan.parse(text)
    if plan.round_contents:
        parsed = attrs.evolve(parsed, content=plan.full_content(parsed.content))
    calls = [ToolCallResponse(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments), index=k)
             for k, c in enumerate(parsed.calls)]
    content: str | None = parsed.content
    if calls and not content:
        content = None
    return ResponseMessage(content=content, tool_calls=calls or None, reasoning_content=parsed.reasoning), bool(calls)


def chat_response(tokenizer: Any, done: Any, *, id: str, model: str, logprobs: bool,
                  token_logprobs: dict[int, list[Any]], plan: Any = None,
                  records: list[Any] | None = None) -> ChatCompletionResponse:
    choices = []
    for c in done.choices:
        message, called = message_for(plan, c.text)
        reason = "tool_calls" if called and c.finish_reason in ("stop", "length") else c.finish_reason
        choices.append(Choice(
            finish_reason=reason, index=c.index, message=message,
            logprobs=logprobs_of(tokenizer, token_logprobs.get(c.index, [])) if logprobs else None,
        ))
    return ChatCompletionResponse(id=id, choices=choices, created=now(), model=model, usage=Usage.from_engine(done.usage),
                                  agentic_tool_calls=list(records) if records else None)


def completion_response(tokenizer: Any, done: Any, *, id: str, model: str, logprobs: bool,
                        token_logprobs: dict[int, list[Any]], echo_prefix: str = "", suffix: str = "") -> CompletionResponse:
    choices = [
        CompletionChoice(
            finish_reason=c.finish_reason, index=c.index, text=echo_prefix + c.text + suffix,
            logprobs=completion_logprobs(tokenizer, token_logprobs.get(c.index, []), offset=len(echo_prefix))
            if logprobs else None,
        )
        for c in done.choices
    ]
    return CompletionResponse(id=id, choices=choices, created=now(), model=model, usage=Usage.from_engine(done.usage))


def _collected(event: Any, lps: LogprobCollector) -> Any:
    """One event of `collect`: the RequestDone that ends it, or None to go on."""
    from mistralrs.engine.engine import RequestDone, RequestFailed, TokenDelta

    if isinstance(event, TokenDelta):
        lps.add(event)
    elif type(event).__name__ == "RoundBoundary":
        lps.entries.pop(event.index, None)  # the response describes the last round
    elif isinstance(event, RequestDone):
        return event
    elif isinstance(event, RequestFailed):
        raise event.error
    return None


def collect(events: Any) -> tuple[Any, dict[int, list[Any]]]:
    """Run a request's events to the end: (RequestDone, per-choice token logprobs).

    Each logprob entry is `(token_id, logprob, top, text)`; `text` is what that token added to
    the output (see `LogprobCollector`)."""
    lps = LogprobCollector()
    for event in events:
        done = _collected(event, lps)
        if done is not None:
            return done, lps.entries
    raise RuntimeError("request ended without a result")


async def acollect(events: Any) -> tuple[Any, dict[int, list[Any]]]:
    """`collect` over an async-iterable handle (one submitted with the running loop)."""
    lps = LogprobCollector()
    async for event in events:
        done = _collected(event, lps)
        if done is not None:
            return done, lps.entries
    raise RuntimeError("request ended without a result")
