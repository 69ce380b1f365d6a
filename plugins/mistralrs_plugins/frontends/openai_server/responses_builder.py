"""The Responses API's response side: `ResponseBuilder` keeps one response object through its
streaming states (the events of each step) to its final form, with usage and logprobs in the
Responses API's shapes."""

from __future__ import annotations

import time
import uuid
from typing import Any, Mapping

from mistralrs import protocol as P
from mistralrs.output_pipeline import ParsedChoice
from mistralrs.response_types import ROUND_SEPARATOR
from mistralrs_plugins.frontends.openai_server.common import stream_error_payload


def _usage(u: Any) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def response_logprobs(tokenizer: Any, entries: list[Any]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        lp = P.logprobs_of(tokenizer, [entry]).content[0]
        out.append({
            "token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
            "top_logprobs": [
                {"token": (t := tokenizer.decode([top.token], skip_special_tokens=False)), "logprob": top.logprob,
                 "bytes": list(t.encode("utf-8"))}
                for top in lp.top_logprobs
            ],
        })
    return out


class ResponseBuilder:
    """One response's object, in its streaming states and final form.

    Output items, in the order the model produced them: a `reasoning` item (when the model
    reasons), the assistant `message` (its text; always present unless the output is only
    function calls) and one `function_call` item per tool call. For streaming, `reasoning`,
    `text`, `call` and `close` return the events of each step as (type, data) pairs."""

    def __init__(self, body: Mapping[str, Any], *, model: str, previous_id: str | None, gen: Any,
                 plan: Any = None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.body = body
        self.model = model
        self.previous_id = previous_id
        self.gen = gen
        self.plan = plan
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []  # {"kind", "id", ...} in output order
        self.calls: list[Any] = []
        self._open: dict[str, Any] | None = None
        self._separate = False
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    # -- items ---------------------------------------------------------------------------------
    def part(self, done: bool) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text if done else "", "annotations": [],
                "logprobs": self.logprobs if done else []}

    def item(self, done: bool, status: str | None = None) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status or ("completed" if done else "in_progress"),
                "role": "assistant", "content": [self.part(True)] if done else []}

    def _render(self, rec: dict[str, Any], done: bool) -> dict[str, Any]:
        status = "in_progress"
        if done:
            # The item max_output_tokens cut off is incomplete, as OpenAI reports it.
            cut = self.status == "incomplete" and rec is self.items[-1]
            status = "incomplete" if cut else "completed"
        if rec["kind"] == "message":
            return self.item(done, status)
        if rec["kind"] == "reasoning":
            return {"type": "reasoning", "id": rec["id"], "status": status, "summary": [],
                    "content": [{"type": "reasoning_text", "text": rec["text"]}] if done else []}
        call = rec["call"]
        return {"type": "function_call", "id": rec["id"], "call_id": call.id, "name": call.name,
                "arguments": call.arguments if done else "", "status": status}

    def output(self) -> list[dict[str, Any]]:
        return [self._render(rec, True) for rec in self.items]

    def _add(self, rec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        events = self.close_open()
        rec["index"] = len(self.items)
        self.items.append(rec)
        events.append(("response.output_item.added", {"output_index": rec["index"], "item": self._render(rec, False)}))
        if rec["kind"] == "message":
            events.append(("response.content_part.added", {**self._ref(rec), "part": self.part(False)}))
        self._open = rec
        return events

    def _ref(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": rec["id"], "output_index": rec["index"], "content_index": 0}

    def close_open(self) -> list[tuple[str, dict[str, Any]]]:
        rec, self._open = self._open, None
        if rec is None:
            return []
        if rec["kind"] == "message":
            return [("response.output_text.done", {**self._ref(rec), "text": self.text, "logprobs": self.logprobs}),
                    ("response.content_part.done", {**self._ref(rec), "part": self.part(True)}),
                    ("response.output_item.done", {"output_index": rec["index"], "item": self._render(rec, True)})]
        return [("response.reasoning_text.done", {**self._ref(rec), "text": rec["text"]}),
                ("response.output_item.done", {"output_index": rec["index"], "item": self._render(rec, True)})]

    # -- streaming steps -----------------------------------------------------------------------
    def reasoning(self, delta: str) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self._open is None or self._open["kind"] != "reasoning":
            events += self._add({"kind": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "text": ""})
        rec = self._open
        assert rec is not None
        rec["text"] += delta
        return events + [("response.reasoning_text.delta", {**self._ref(rec), "delta": delta})]

    def _message(self) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
        rec = next((r for r in self.items if r["kind"] == "message"), None)
        if rec is not None and self._open is rec:
            return [], rec
        if rec is not None:  # text after a call: the message item is re-opened in place
            events = self.close_open()
            self._open = rec
            return events, rec
        events = self._add({"kind": "message", "id": self.message_id})
        return events, self._open  # type: ignore[return-value]

    def new_round(self) -> None:
        """The tool loop ran a server-side call: the next text is a new paragraph."""
        self._separate = bool(self.text)

    def text_delta(self, delta: str, logprobs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        if self._separate:
            self._separate = False
            delta = ROUND_SEPARATOR + delta
        events, rec = self._message()
        self.text += delta
        self.logprobs.extend(logprobs)
        return events + [("response.output_text.delta", {**self._ref(rec), "delta": delta, "logprobs": logprobs})]

    def call(self, call: Any) -> list[tuple[str, dict[str, Any]]]:
        self.calls.append(call)
        rec = {"kind": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call": call}
        events = self._add(rec)
        self._open = None
        ref = {"item_id": rec["id"], "output_index": rec["index"]}
        return events + [
            ("response.function_call_arguments.delta", {**ref, "delta": call.arguments}),
            ("response.function_call_arguments.done", {**ref, "arguments": call.arguments}),
            ("response.output_item.done", {"output_index": rec["index"], "item": self._render(rec, True)}),
        ]

    def close(self) -> list[tuple[str, dict[str, Any]]]:
        """End of the output: close what is open; an output with nothing gets an empty message."""
        events = self.close_open()
        if not self.items:
            events += self._add({"kind": "message", "id": self.message_id}) + self.close_open()
        return events

    # -- the whole output at once ---------------------------------------------------------------
    def set_output(self, text: str) -> None:
        parsed = self.plan.parse(text) if self.plan is not None and self.plan.active else ParsedChoice(text, None)
        if self.plan is not None and self.plan.round_contents:
            parsed = ParsedChoice(self.plan.full_content(parsed.content), parsed.reasoning, parsed.calls)
        if parsed.reasoning:
            self.items.append({"kind": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "text": parsed.reasoning,
                               "index": len(self.items)})
        self.text = parsed.content
        if parsed.content or not parsed.calls:
            self.items.append({"kind": "message", "id": self.message_id, "index": len(self.items)})
        for call in parsed.calls:
            self.calls.append(call)
            self.items.append({"kind": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call": call,
                               "index": len(self.items)})

    def assistant_message(self) -> dict[str, Any]:
        """The turn as a chat message (for chaining with previous_response_id)."""
        if not self.calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.text or None,
                "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in self.calls]}

    def obj(self) -> dict[str, Any]:
        finished = self.status in ("completed", "incomplete")
        sampling = self.gen.sampling
        fmt = (self.body.get("text") or {}).get("format") if isinstance(self.body.get("text"), Mapping) else None
        reasoning = self.body.get("reasoning") if isinstance(self.body.get("reasoning"), Mapping) else {}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": int(time.time()) if finished else None,
            "error": self.error, "incomplete_details": self.incomplete,
            "instructions": self.body.get("instructions"),
            "max_output_tokens": self.gen.max_tokens, "model": self.model,
            "output": self.output() if finished else [],
            "parallel_tool_calls": True, "previous_response_id": self.previous_id,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": self.body.get("store", True) is not False,
            "temperature": getattr(sampling, "temperature", None), "top_p": getattr(sampling, "top_p", None),
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": self.body.get("tool_choice", "auto"),
            "tools": self.body.get("tools") or [], "truncation": "disabled",
            "usage": self.usage, "user": self.body.get("user"), "metadata": self.body.get("metadata") or {},
            "output_text": self.text if finished else "",
        }

    def finish(self, done: Any, *, streamed: bool = False) -> None:
        choice = done.choices[0]
        if not streamed:
            self.set_output(choice.text)
        self.usage = _usage(done.usage)
        if choice.finish_reason == "length":
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
        elif choice.finish_reason == "canceled":
            self.status = "cancelled"
        else:
            self.status = "completed"

    def fail(self, exc: BaseException) -> None:
        err = stream_error_payload(exc)["error"]
        self.status = "failed"
        self.error = {"code": err.get("code") or "server_error", "message": err["message"]}
