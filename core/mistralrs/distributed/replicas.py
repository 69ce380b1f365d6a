"""Data parallelism: N engine replicas (processes) behind one server; which one takes a request.

Each replica is a whole model and engine in its own process (``serve --data-parallel-size N``
starts N ``serve`` replicas on private ports and routes to them). `Router.pick` chooses:

- **prefix affinity**: a request's affinity key (`affinity_key`: the conversation's opening -
  system prompt and first user message - for chat, the prompt's head for completions, the
  ``previous_response_id`` for the Responses API) maps to the replica that served it last, so
  a conversation's next turn finds its prefix in that replica's prefix cache;
- **load**: unless that replica has `slack` more requests in flight than the least-loaded live
  one; then (and for new keys) the least-loaded replica, ties broken by a hash of the key so
  equal loads spread deterministically.

Pure bookkeeping (no processes, no I/O): the server counts in-flight requests with `started`/
`finished` and marks a dead replica `down`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

AFFINITY_ENTRIES = 65536  # keys remembered (least recently used forgotten first)
PROMPT_HEAD = 512  # characters of a completion prompt that make its key


def affinity_key(path: str, body: Any) -> str | None:
    """The conversation a request belongs to, as a short hash (None: no affinity)."""
    if not isinstance(body, dict):
        return None
    if path.endswith("/responses") and isinstance(body.get("previous_response_id"), str):
        return "resp:" + body["previous_response_id"]
    opening: Any = None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        opening = []
        for message in messages:
            opening.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
    elif isinstance(body.get("prompt"), str):
        opening = body["prompt"][:PROMPT_HEAD]
    elif isinstance(body.get("input"), (str, list)):
        opening = body["input"][:PROMPT_HEAD] if isinstance(body["input"], str) else body["input"][:1]
    if opening is None:
        return None
    text = json.dumps([body.get("model"), opening], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class Router:
    """Load- and prefix-aware choice among `n` replicas (thread-safe)."""

    def __init__(self, n: int, *, slack: int = 2) -> None:
        self.n = n
        self.slack = slack
        self.inflight = [0] * n
        self.served = [0] * n
        self.alive = [True] * n
        self._affinity: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def pick(self, key: str | None = None) -> int:
        """The replica for a request with affinity `key`; raises RuntimeError when none is alive."""
        with self._lock:
            live = [i for i in range(self.n) if self.alive[i]]
            if not live:
                raise RuntimeError("every data-parallel replica is down")
            least = min(self.inflight[i] for i in live)
            if key is not None:
                last = self._affinity.get(key)
                if last is not None and self.alive[last] and self.inflight[last] <= least + self.slack:
                    self._affinity.move_to_end(key)
                    return last
            candidates = [i for i in live if self.inflight[i] == least]
            choice = candidates[int(hashlib.blake2b((key or "").encode(), digest_size=4).hexdigest(), 16)
                                % len(candidates)] if key else candidates[self.served_rotation(candidates)]
            if key is not None:
                self._affinity[key] = choice
                self._affinity.move_to_end(key)
                while len(self._affinity) > AFFINITY_ENTRIES:
                    self._affinity.popitem(last=False)
            return choice

    def served_rotation(self, candidates: list[int]) -> int:
        """Among equally loaded replicas without a key: the one that served least so far."""
        return min(range(len(candidates)), key=lambda j: self.served[candidates[j]])

    def started(self, i: int) -> None:
        with self._lock:
            self.inflight[i] += 1
            self.served[i] += 1

    def finished(self, i: int) -> None:
        with self._lock:
            self.inflight[i] = max(0, self.inflight[i] - 1)

    def down(self, i: int) -> None:
        with self._lock:
            self.alive[i] = False
            for key in [k for k, v in self._affinity.items() if v == i]:
                del self._affinity[key]

    def remember(self, key: str, i: int) -> None:
        """Route `key` to replica `i` from now on (a Responses id it created)."""
        with self._lock:
            self._affinity[key] = i
            self._affinity.move_to_end(key)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"replica": i, "alive": self.alive[i], "in_flight": self.inflight[i], "served": self.served[i]}
                    for i in range(self.n)]
