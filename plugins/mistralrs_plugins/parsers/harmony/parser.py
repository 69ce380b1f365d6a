"""The Harmony format of GPT-OSS, split while streaming. An assistant turn is a series of
messages ``[<|start|>assistant]<|channel|>NAME[ to=...][<|constrain|>...]<|message|>BODY``,
each ending at ``<|end|>``, ``<|return|>``, ``<|call|>`` or the next ``<|start|>``. Bodies of the
``analysis`` channel are reasoning; ``final`` (and ``commentary`` addressed to no tool, the
model's preambles) are content; messages addressed to a tool (``to=...``) are left out, since
the Harmony tool-call parser does not exist yet. Output without any header is content."""

from __future__ import annotations

from mistralrs.parse_toolkit import partial_suffix
from mistralrs.reasoning_parser import ReasoningParser

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>", START)
MARKERS = (START, CHANNEL, MESSAGE, *ENDS)


class HarmonyReasoningParser(ReasoningParser):
    open_tag = CHANNEL  # a special token: the chat plan keeps special tokens in the text for it
    close_tag = None

    def reset(self) -> None:
        self._buf = ""
        self._header: str | None = None  # inside a header: its text so far; None inside a body
        self._target: str | None = "content"  # where the current body goes (None: dropped)
        self._started = False

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._process(final=False)

    def finish(self) -> tuple[str, str]:
        return self._process(final=True)

    def _route(self, header: str) -> str | None:
        head = header.removeprefix(START).removeprefix("assistant").strip()
        head = head.removeprefix(CHANNEL).strip()
        name, _, rest = head.partition(" ")
        if "to=" in rest or "to=" in name:
            return None  # a tool call
        return "reasoning" if name == "analysis" else "content"

    def _process(self, final: bool) -> tuple[str, str]:
        out = {"reasoning": [], "content": []}
        while self._buf:
            if not self._started:
                if self._buf.startswith((START, CHANNEL)):
                    self._header, self._started = "", True
                elif len(self._buf) < len(CHANNEL) and (CHANNEL.startswith(self._buf) or START.startswith(self._buf)) \
                        and not final:
                    break  # might still become a header
                else:
                    self._started = True  # plain text: content
            if self._header is not None:
                end = self._buf.find(MESSAGE)
                if end < 0:
                    if final:
                        self._buf = ""
                    break
                self._target = self._route(self._header + self._buf[:end])
                self._buf = self._buf[end + len(MESSAGE):]
                self._header = None
                continue
            cut = min((i for i in (self._buf.find(m) for m in ENDS) if i >= 0), default=-1)
            if cut < 0:
                keep = 0 if final else partial_suffix(self._buf, MARKERS)
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                if self._target is not None and text:
                    out[self._target].append(text)
                break
            if self._target is not None and cut:
                out[self._target].append(self._buf[:cut])
            marker = next(m for m in ENDS if self._buf.startswith(m, cut))
            self._buf = self._buf[cut + (0 if marker == START else len(marker)):]
            self._header = ""  # the next message's header follows
        return "".join(out["reasoning"]), "".join(out["content"])

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        return False
