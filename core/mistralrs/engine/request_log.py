"""`-l/--log FILE`: every request and its response appended to a file as JSON lines.

Logged at the engine, so requests from the HTTP server, the Python API and interactive mode
are all recorded the same way: one `request` line when a request is accepted, one `response`
(or `error`) line when it ends."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import attrs


class RequestLog:
    def __init__(self, path: str | Path, tokenizer: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def request(self, req: Any) -> None:
        sampling = attrs.asdict(req.sampling) if attrs.has(type(req.sampling)) else repr(req.sampling)
        record = {
            "type": "request", "time": time.time(), "request_id": req.id,
            "prompt_tokens": len(req.prompt_ids), "max_tokens": req.max_tokens, "n": req.n,
            "stop": list(req.stop_strings), "sampling": sampling,
        }
        if self.tokenizer is not None:
            record["prompt"] = self.tokenizer.decode(req.prompt_ids, skip_special_tokens=False)
        else:
            record["prompt_ids"] = list(req.prompt_ids)
        self._write(record)

    def response(self, req: Any, done: Any) -> None:
        self._write({
            "type": "response", "time": time.time(), "request_id": req.id,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason} for c in done.choices],
            "usage": {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens,
                      "cached_tokens": done.usage.cached_tokens, "total_seconds": done.usage.total_seconds},
        })

    def error(self, req: Any, error: BaseException) -> None:
        self._write({"type": "error", "time": time.time(), "request_id": req.id, "error": str(error)})
