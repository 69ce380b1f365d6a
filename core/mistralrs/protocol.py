"""OpenAI-shaped requests and responses shared by the Python API and the HTTP server, and the
translation between them and the engine.

Requests are validated here (`InvalidRequest(message, param)` names the bad field); responses
are attrs classes with the field names of mistral.rs's Python package and OpenAI's JSON, turned
into JSON by `to_json` (one cattrs converter).

This module is the one place to import them from (`from mistralrs import protocol as P`); they
live in smaller modules:

- `mistralrs.response_types`: the response objects, `to_json`;
- `mistralrs.request_validation`: request fields, messages, the engine request of a body;
- `mistralrs.response_logprobs`: logprobs in OpenAI's shapes;
- `mistralrs.event_conversion`: engine events -> responses (`ChatStream`, `collect`, ...);
- `mistralrs.chat_plan`: a chat request's plan (`build_chat_request` below uses it).
"""

from __future__ import annotations

from typing import Any, Mapping

from mistralrs.event_conversion import (
    ChatStream,
    acollect,
    chat_response,
    collect,
    completion_response,
    message_for,
    now,
)
from mistralrs.request_validation import (
    CHAT_TEMPLATE_KWARGS,
    build_completion_request,
    generation_request,
    max_tokens_of,
    normalize_messages,
    sampling_from,
    stop_strings,
)
from mistralrs.response_logprobs import (
    LogprobCollector,
    completion_logprobs,
    entry_text,
    finite_logprob,
    logprobs_of,
    with_text,
)
from mistralrs.response_types import (
    ROUND_SEPARATOR,
    AgenticToolCallRecord,
    ChatCompletionChunkResponse,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    Delta,
    Logprobs,
    ResponseLogprob,
    ResponseMessage,
    ToolCallFunction,
    ToolCallResponse,
    TopLogprob,
    Usage,
    converter,
    to_json,
)

__all__ = [
    "CHAT_TEMPLATE_KWARGS", "ROUND_SEPARATOR", "AgenticToolCallRecord", "ChatCompletionChunkResponse",
    "ChatCompletionResponse", "ChatStream", "Choice", "ChunkChoice", "CompletionChoice", "CompletionResponse",
    "Delta", "LogprobCollector", "Logprobs", "ResponseLogprob", "ResponseMessage", "ToolCallFunction",
    "ToolCallResponse", "TopLogprob", "Usage", "build_chat_request", "build_completion_request", "chat_response",
    "acollect", "collect", "completion_logprobs", "completion_response", "converter", "entry_text", "finite_logprob",
    "generation_request", "logprobs_of", "max_tokens_of", "message_for", "normalize_messages", "now",
    "sampling_from", "stop_strings", "to_json", "with_text",
]

def build_chat_request(service: Any, body: Mapping[str, Any], config: Any = None) -> Any:
    """A validated `GenerationRequest` from a chat-completions body (dict of OpenAI fields).
    Use `mistralrs.chat_plan.prepare_chat` to also get the output parsers."""
    from mistralrs.chat_plan import prepare_chat

    return prepare_chat(service, body, config).request
