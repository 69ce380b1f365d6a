"""The Anthropic Messages API's response side: the `message` object from a chat response,
`MessageStream` turning the chat stream's chunks (`protocol.ChatStream`, which runs the
reasoning and tool-call parsers) into Anthropic's events, and the error envelope."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from mistralrs_plugins.frontends.anthropic.request import tool_input
from mistralrs_plugins.frontends.openai_server.common import ApiError, api_error_from, dumps, sse_data

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 529: "overloaded_error",
}


def error_envelope(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(err: ApiError) -> web.Response:
    """An `ApiError` in Anthropic's envelope: `{"type": "error", "error": {"type", "message"}}`."""
    inner = err.body["error"]
    body = error_envelope(err.status, inner["message"])
    return web.json_response(body, status=err.status, headers=err.headers, dumps=dumps)


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def stop_reason(choice: Any, finish_reason: str, stop_sequences: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished choice."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    matched = getattr(choice, "stop_reason", None)
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def usage(u: Any, *, output_tokens: int | None = None) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens if output_tokens is None
            else output_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}


def message_object(chat: Any, done: Any, *, id: str, model: str, stop_sequences: list[str]) -> dict[str, Any]:
    """The `message` of a finished (non-streamed) request, from its chat response."""
    choice = chat.choices[0]
    msg = choice.message
    content: list[dict[str, Any]] = []
    if msg.reasoning_content:
        content.append({"type": "thinking", "thinking": msg.reasoning_content, "signature": ""})
    if msg.content or not msg.tool_calls:
        content.append({"type": "text", "text": msg.content or ""})
    for call in msg.tool_calls or ():
        content.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                        "input": tool_input(call.function.arguments)})
    reason, sequence = stop_reason(done.choices[0], choice.finish_reason, stop_sequences)
    return {"id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(done.usage)}


def event(kind: str, **data: Any) -> bytes:
    return sse_data({"type": kind, **data}, event=kind)


PING = event("ping")


class MessageStream:
    """One streamed message: `start()` gives `message_start` and a `ping`; `chunk(c)` turns a
    chat chunk's delta into content-block events (a block opens when its kind changes: thinking,
    text, one tool_use per call); `finish(done, finished)` closes the open block and ends with
    `message_delta` (stop reason, usage) and `message_stop`."""

    def __init__(self, *, id: str, model: str, input_tokens: int, stop_sequences: list[str]) -> None:
        self.id, self.model = id, model
        self.input_tokens = input_tokens
        self.stop_sequences = stop_sequences
        self.index = -1
        self.open: str | None = None
        self.finish_reason: str | None = None

    def start(self) -> list[bytes]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return [event("message_start", message=message), PING]

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", index=self.index)]

    def _block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self.index += 1
        self.open = kind
        return out + [event("content_block_start", index=self.index, content_block=block)]

    def _delta(self, kind: str, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", index=self.index, delta={"type": kind, **delta})

    def chunk(self, chunk: Any) -> list[bytes]:
        out: list[bytes] = []
        for choice in chunk.choices:
            delta = choice.delta
            if delta.reasoning_content:
                if self.open != "thinking":
                    out += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta("thinking_delta", {"thinking": delta.reasoning_content}))
            if delta.content:
                if self.open != "text":
                    out += self._block("text", {"type": "text", "text": ""})
                out.append(self._delta("text_delta", {"text": delta.content}))
            for call in delta.tool_calls or ():
                fn = call["function"]
                out += self._block("tool_use", {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": {}})
                out.append(self._delta("input_json_delta", {"partial_json": fn["arguments"]}))
                out += self._close()
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        return out

    def finish(self, done: Any) -> list[bytes]:
        out = self._close()
        reason, sequence = stop_reason(done.choices[0], self.finish_reason or done.choices[0].finish_reason,
                                       self.stop_sequences)
        return out + [
            event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                  usage=usage(done.usage)),
            event("message_stop"),
        ]

    @staticmethod
    def error(exc: BaseException) -> list[bytes]:
        """A failure after the stream started: an `error` event (Anthropic's stream has no [DONE])."""
        err = api_error_from(exc)
        return [sse_data(error_envelope(err.status, err.body["error"]["message"]), event="error")]
