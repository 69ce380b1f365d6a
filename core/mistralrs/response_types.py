"""The OpenAI-shaped response objects shared by the Python API and the HTTP server: attrs classes
with the field names of mistral.rs's Python package and OpenAI's JSON, turned into JSON by
`to_json` (one cattrs converter)."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

# Between the texts of two rounds of the tool loop, in a turn's content.
ROUND_SEPARATOR = "\n\n"

converter = cattrs.Converter(omit_if_default=False)


def to_json(obj: Any) -> Any:
    return converter.unstructure(obj)


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
