"""OpenAI-shaped requests and responses shared by the Python API and the HTTP server, and the
translation between them and the engine.

Requests are validated here (`InvalidRequest(message, param)` names the bad field); responses
are attrs classes with the field names of mistral.rs's Python package and OpenAI's JSON, turned
into JSON by `to_json` (one cattrs converter).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import attrs
import cattrs

from mistralrs import json_input
from mistralrs.errors import InvalidRequest

converter = cattrs.Converter(omit_if_default=False)


def to_json(obj: Any) -> Any:
    return converter.unstructure(obj)


# -- responses ------------------------------------------------------------------------------
@attrs.define
class Usage:
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    avg_tok_per_sec: float = 0.0
    avg_prompt_tok_per_sec: float = 0.0
    avg_compl_tok_per_sec: float = 0.0
    total_time_sec: float = 0.0
    total_prompt_time_sec: float = 0.0
    total_completion_time_sec: float = 0.0
    prompt_tokens_details: dict[str, int] | None = None

    @classmethod
    def from_engine(cls, u: Any) -> Usage:
        total = u.total_seconds or 0.0
        return cls(
            completion_tokens=u.completion_tokens,
            prompt_tokens=u.prompt_tokens,
            total_tokens=u.total_tokens,
            avg_tok_per_sec=(u.total_tokens / total) if total else 0.0,
            avg_prompt_tok_per_sec=u.prompt_tok_per_sec or 0.0,
            avg_compl_tok_per_sec=u.completion_tok_per_sec or 0.0,
            total_time_sec=total,
            total_prompt_time_sec=u.prompt_seconds or 0.0,
            total_completion_time_sec=u.completion_seconds or 0.0,
            prompt_tokens_details={"cached_tokens": u.cached_tokens},
        )


@attrs.define
class TopLogprob:
    token: int  # a token id, as mistral.rs returns it
    logprob: float
    bytes: str | None = None


@attrs.define
class ResponseLogprob:
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = attrs.field(factory=list)


@attrs.define
class Logprobs:
    content: list[ResponseLogprob] | None = None


@attrs.define
class ToolCallFunction:
    name: str
    arguments: str


@attrs.define
class ToolCallResponse:
    id: str
    function: ToolCallFunction
    type: str = "function"
    index: int = 0


@attrs.define
class ResponseMessage:
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCallResponse] | None = None
    reasoning_content: str | None = None


@attrs.define
class Choice:
    finish_reason: str
    index: int
    message: ResponseMessage
    logprobs: Logprobs | None = None


@attrs.define
class AgenticToolCallRecord:
    """One server-side tool call the tool loop ran (`round` counts from 0)."""

    round: int
    name: str
    arguments: str
    result_content: str


@attrs.define
class ChatCompletionResponse:
    id: str
    choices: list[Choice]
    created: int
    model: str
    usage: Usage
    system_fingerprint: str = "local"
    object: str = "chat.completion"
    agentic_tool_calls: list[AgenticToolCallRecord] | None = None  # omitted from JSON when None


@attrs.define
class Delta:
    content: str | None = None
    role: str | None = None
    tool_calls: list[Any] | None = None
    reasoning_content: str | None = None


@attrs.define
class ChunkChoice:
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: Logprobs | None = None


@attrs.define
class ChatCompletionChunkResponse:
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    usage: Usage | None = None
    system_fingerprint: str = "local"
    object: str = "chat.completion.chunk"
    agentic_tool_calls: list[AgenticToolCallRecord] | None = None  # omitted from JSON when None


def _omit_none(cls: type, *fields: str) -> None:
    """JSON for `cls` leaves out `fields` when they are None (optional extensions)."""
    from cattrs.gen import make_dict_unstructure_fn, override

    overrides: dict[str, Any] = {f: override(omit_if_default=True) for f in fields}
    fn: Any = make_dict_unstructure_fn(cls, converter, **overrides)
    converter.register_unstructure_hook(cls, fn)


_omit_none(ChatCompletionResponse, "agentic_tool_calls")
_omit_none(ChatCompletionChunkResponse, "agentic_tool_calls")


@attrs.define
class CompletionChoice:
    finish_reason: str | None
    index: int
    text: str
    logprobs: Any = None


@attrs.define
class CompletionResponse:
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    usage: Usage | None = None
    system_fingerprint: str = "local"
    object: str = "text_completion"


# -- request validation ---------------------------------------------------------------------
def _num(value: Any, param: str, *, lo: float | None = None, hi: float | None = None, integer: bool = False) -> Any:
    from mistralrs.engine.sampling_params import Bounds

    return _checked(value, param, Bounds(lo, hi, integer=integer))


def _checked(value: Any, param: str, bounds: Any) -> Any:
    """`value` if `bounds` (a `sampling_params.Bounds`) accepts it (None passes), else a 400."""
    if value is None:
        return None
    problem = bounds.problem(value)
    if problem:
        raise InvalidRequest(f"{param} {problem}, got {value!r}", param)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def sampling_from(body: Mapping[str, Any], *, seed: int | None = None) -> Any:
    """SamplingParams from OpenAI/mistral.rs request fields, each checked against its
    documented range (`sampling_params.FIELD_BOUNDS`)."""
    from mistralrs.engine.sampling_params import FIELD_BOUNDS, LOGIT_BIAS_BOUNDS, SamplingParams

    bias = body.get("logit_bias") or {}
    if not isinstance(bias, Mapping):
        raise InvalidRequest("logit_bias must map token ids to numbers", "logit_bias")
    logit_bias = []
    for key, value in bias.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isdigit():
            token = int(key)
        if token is None or token < 0:
            raise InvalidRequest(f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                                 "logit_bias")
        if LOGIT_BIAS_BOUNDS.problem(value):
            raise InvalidRequest(f"logit_bias values {LOGIT_BIAS_BOUNDS.problem(value)}, got {value!r}",
                                 "logit_bias")
        logit_bias.append((token, float(value)))
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None and (not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers)):
        raise InvalidRequest("dry_sequence_breakers must be a list of strings", "dry_sequence_breakers")
    fields = {name: _checked(body.get(name), name, bounds) for name, bounds in FIELD_BOUNDS.items()}
    logprobs = _flag(body, "logprobs")
    top_logprobs = fields.pop("top_logprobs")
    kwargs: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    kwargs.update(
        logit_bias=tuple(logit_bias),
        seed=fields["seed"] if fields["seed"] is not None else seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs if top_logprobs is not None else (1 if logprobs else 0),
    )
    if breakers is not None:
        kwargs["dry_sequence_breakers"] = tuple(breakers)
    return SamplingParams(**kwargs)


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > 32:
            raise InvalidRequest("stop accepts at most 32 strings", "stop")
        return tuple(value)
    raise InvalidRequest("stop must be a string or a list of strings", "stop")


def max_tokens_of(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _num(value, param, lo=1, integer=True)


def _render_tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` in the form chat templates expect: `{"id", "type":
    "function", "function": {"name", "arguments"}}` with `arguments` a dict (requests carry
    it as a JSON string; HF templates iterate or `tojson` it). A string that is not a JSON
    object stays a string."""

    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] must be an object", "messages")
        nested = call.get("function")
        fn: Mapping[str, Any] = nested if isinstance(nested, Mapping) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] needs a function name", "messages")
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):
            try:
                parsed = json_input.loads(args) if args.strip() else {}
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                args = parsed
        elif args is None:
            args = {}
        elif not isinstance(args, Mapping):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string "
                                 "or an object", "messages")
        rendered: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if call.get("id") is not None:
            rendered["id"] = call["id"]
        out.append(rendered)
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts ready for the chat template: a string is one user message;
    text parts are joined; assistant `tool_calls` get their arguments as objects."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of messages or a string", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        msg = dict(m)
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise InvalidRequest(
                        f"messages[{i}].content has a {kind!r} part; this model takes text parts only", "messages"
                    )
                texts.append(part["text"])
            msg["content"] = " ".join(texts)
        elif content is None and not msg.get("tool_calls"):
            if msg["role"] != "assistant":
                raise InvalidRequest(f"messages[{i}].content is missing", "messages")
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts", "messages")
        if msg.get("tool_calls") is not None:
            if msg["role"] != "assistant":
                raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls", "messages")
            msg["tool_calls"] = _render_tool_calls(msg["tool_calls"], i)
        if "reasoning" in msg and "reasoning_content" not in msg:
            msg["reasoning_content"] = msg.pop("reasoning")
        out.append(msg)
    return out


def now() -> int:
    return int(time.time())


def _entry_text(tokenizer: Any, entry: Sequence[Any]) -> str:
    """The text of one logprob entry: the text the token released into the output when known
    (4th element, recorded by `collect`/`ChatStream`), else the token decoded alone.

    Using the released text makes the entries' `token` strings concatenate to the content
    exactly, even when a character spans several byte-level tokens or a stop string was cut."""
    if len(entry) > 3 and entry[3] is not None:
        return entry[3]
    return tokenizer.decode([entry[0]], skip_special_tokens=False)


def finite_logprob(value: Any) -> float:
    """A logprob JSON can carry: -inf (a banned token) and NaN become -9999.0, as OpenAI does."""
    value = float(value)
    return value if value > -9999.0 else -9999.0  # also catches NaN (comparisons are False)


def logprobs_of(tokenizer: Any, entries: Sequence[Any]) -> Logprobs:
    """OpenAI chat logprobs from the engine's (token_id, logprob, top[, text]) entries."""
    content = []
    for entry in entries:
        logprob, top = entry[1], entry[2]
        text = _entry_text(tokenizer, entry)
        content.append(ResponseLogprob(
            token=text, logprob=finite_logprob(logprob), bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(int(t), finite_logprob(lp)) for t, lp in top],
        ))
    return Logprobs(content=content)


def _with_text(event: Any) -> list[Any]:
    """A TokenDelta's logprob entries with the released text attached (one token per delta,
    which is how the engine emits them; otherwise the tokens are decoded alone)."""
    if len(event.logprobs) == 1:
        return [(*event.logprobs[0][:3], event.text)]
    return list(event.logprobs)


# -- requests -> engine ---------------------------------------------------------------------
CHAT_TEMPLATE_KWARGS = ("enable_thinking", "reasoning_effort")


def build_chat_request(service: Any, body: Mapping[str, Any], config: Any = None) -> Any:
    """A validated `GenerationRequest` from a chat-completions body (dict of OpenAI fields).
    Use `mistralrs.tool_calling.prepare_chat` to also get the output parsers."""
    from mistralrs.tool_calling import prepare_chat

    return prepare_chat(service, body, config).request


def build_completion_request(service: Any, body: Mapping[str, Any]) -> Any:
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        # Legacy completions: `logprobs` is the number of top logprobs per token (0-20).
        top = _num(logprobs, "logprobs", lo=0, hi=20, integer=True)
        body = {**body, "logprobs": True, "top_logprobs": top}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, str) and not prompt):
        raise InvalidRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    ids = service.encode_completion(prompt, truncating=bool(body.get("truncate_sequence")))
    return _generation_request(service, body, ids)


_FROM_BODY: Any = object()


def _generation_request(service: Any, body: Mapping[str, Any], ids: list[int], *, grammar: Any = _FROM_BODY,
                        skip_special_tokens: bool = True) -> Any:
    from mistralrs.engine.constraints import grammar_from_request
    from mistralrs.engine.engine import ContextTooLong, GenerationRequest

    if grammar is _FROM_BODY:
        grammar = grammar_from_request(body)

    max_tokens = max_tokens_of(body)
    n = _num(body.get("n", 1), "n", lo=1, hi=128, integer=True)
    best_of = _num(body.get("best_of"), "best_of", lo=1, hi=128, integer=True)
    if best_of is not None and best_of < n:
        raise InvalidRequest("best_of must be >= n", "best_of")
    if body.get("truncate_sequence"):
        ids = service.truncate(ids, max_tokens)
    if len(ids) >= service.max_model_len:
        raise ContextTooLong(len(ids), service.max_model_len)
    stop_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_ids, (list, tuple)) or not all(isinstance(t, int) for t in stop_ids):
        raise InvalidRequest("stop_token_ids must be a list of integers", "stop_token_ids")
    sampling = sampling_from(body)
    return GenerationRequest(
        prompt_ids=ids,
        sampling=sampling,
        max_tokens=max_tokens,
        stop_strings=stop_strings(body.get("stop")),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(body.get("ignore_eos", False)),
        n=n,
        best_of=best_of if best_of and best_of > n else None,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        grammar=grammar,
        skip_special_tokens=skip_special_tokens,
    )


# -- engine events -> responses ------------------------------------------------------------
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
            return _completion_logprobs(self.tokenizer, entries, offset=self.text_offsets.get(index, self.text_offset_start))
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
        if not chunks or self.completion:
            return chunks
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
                    entries = pending + _with_text(event)
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
                from mistralrs.tool_calling import ROUND_SEPARATOR

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
            logprobs=_completion_logprobs(tokenizer, token_logprobs.get(c.index, []), offset=len(echo_prefix))
            if logprobs else None,
        )
        for c in done.choices
    ]
    return CompletionResponse(id=id, choices=choices, created=now(), model=model, usage=Usage.from_engine(done.usage))


def _completion_logprobs(tokenizer: Any, entries: Sequence[Any], *, offset: int = 0) -> dict[str, Any]:
    """Legacy-completions logprobs: parallel lists; `text_offset` is each token's start in the
    choice's text (`offset` = where generated text starts, e.g. after an echoed prompt)."""
    tokens, lps, tops, offsets = [], [], [], []
    for entry in entries:
        text = _entry_text(tokenizer, entry)
        tokens.append(text)
        lps.append(finite_logprob(entry[1]))
        tops.append({tokenizer.decode([t], skip_special_tokens=False): finite_logprob(lp) for t, lp in entry[2]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class LogprobCollector:
    """Gathers per-choice logprob entries `(token_id, logprob, top, text)` from TokenDeltas.

    Text the engine releases without a token (held back by the detokenizer or a stop-string
    check and flushed when the choice ends) is added to the choice's last entry, so the
    entries' texts always concatenate to the choice's text."""

    def __init__(self) -> None:
        self.entries: dict[int, list[Any]] = {}

    def add(self, event: Any) -> None:
        if event.logprobs:
            self.entries.setdefault(event.index, []).extend(_with_text(event))
        elif event.text and self.entries.get(event.index):
            last = self.entries[event.index][-1]
            text = last[3] if len(last) > 3 and last[3] is not None else ""
            self.entries[event.index][-1] = (*last[:3], text + event.text)


def collect(events: Any) -> tuple[Any, dict[int, list[Any]]]:
    """Run a request's events to the end: (RequestDone, per-choice token logprobs).

    Each logprob entry is `(token_id, logprob, top, text)`; `text` is what that token added to
    the output (see `LogprobCollector`)."""
    from mistralrs.engine.engine import RequestDone, RequestFailed, TokenDelta

    lps = LogprobCollector()
    for event in events:
        if isinstance(event, TokenDelta):
            lps.add(event)
        elif type(event).__name__ == "RoundBoundary":
            lps.entries.pop(event.index, None)  # the response describes the last round
        elif isinstance(event, RequestDone):
            return event, lps.entries
        elif isinstance(event, RequestFailed):
            raise event.error
    raise RuntimeError("request ended without a result")
