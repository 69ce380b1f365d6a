"""The per-request caps, in one table: how many messages, tools, choices (`n`), stop strings
(and how long each may be) one request may carry. A request over a cap is a 400 naming the cap
(`code: "limit_exceeded"`). The other limits live beside what they limit: the body size
(`BODY_LIMIT` of the HTTP server, 413), `top_logprobs` and every sampling range
(`sampling_params.FIELD_BOUNDS`), `max_tokens` (at most the model's context length,
`request_validation.max_tokens_of`)."""

from __future__ import annotations

from typing import Any

from mistralrs.errors import InvalidRequest

MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's cap on functions per request
MAX_N = 128
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 1024


def limit_exceeded(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param, code="limit_exceeded")


def check_count(items: Any, limit: int, param: str, what: str) -> None:
    """A 400 naming `limit` when `items` (a sized collection) holds more than `limit` `what`."""
    if len(items) > limit:
        raise limit_exceeded(f"{param} has {len(items)} {what}; the limit is {limit} per request", param)
