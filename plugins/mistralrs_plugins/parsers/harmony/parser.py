"""The Harmony format of GPT-OSS, split while streaming. An assistant turn is a series of
messages ``[<|start|>assistant]<|channel|>NAME[ to=...][<|constrain|>...]<|message|>BODY``,
each ending at ``<|end|>``, ``<|return|>``, ``<|call|>`` or the next ``<|start|>``. Bodies of the
``analysis`` channel are reasoning; ``final`` (and ``commentary`` addressed to no tool, the
model's preambles) are content. A message addressed to a tool (``to=functions.NAME``) passes to
the content in one canonical form,
``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>``, for the
`harmony` tool-call parser that runs next. Output without any header is content."""

from __future__ import annotations

import re

from mistralrs.parse_toolkit import partial_suffix
from mistralrs.reasoning_parser import ReasoningParser

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>", START)
MARKERS = (START, CHANNEL, MESSAGE, *ENDS)
CALL_END = "<|call|>"
_RECIPIENT = re.compile(r"to=([^\s<]+)")


def call_header(recipient: str) -> str:
    """The canonical text that opens a tool call (what the tool-call parser looks for)."""
    return f"{CHANNEL}commentary to={recipient} <|constrain|>json{MESSAGE}"


class HarmonyReasoningParser(ReasoningParser):
    open_tag = CHANNEL  # a special token: the chat plan keeps special tokens in the text for it
    close_tag = None

    def reset(self) -> None:
        self._buf = ""
        self._header: str | None = None  # inside a header: its text so far; None inside a body
        self._target = "content"  # where the current body goes
        self._calling = False  # the current body is a tool call's arguments
        self._started = False

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._process(final=False)

    def finish(self) -> tuple[str, str]:
        return self._process(final=True)

    def _route(self, header: str) -> tuple[str, str]:
        """(where the body goes, text to emit there first)."""
        recipient = _RECIPIENT.search(header)
        if recipient is not None:  # a tool call, in the tool-call parser's canonical form
            return "content", call_header(recipient.group(1))
        channel = header.split(CHANNEL, 1)[-1].strip().split(" ")[0] if CHANNEL in header else ""
        return ("reasoning" if channel == "analysis" else "content"), ""

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
                self._target, opening = self._route(self._header + self._buf[:end])
                self._calling = bool(opening)
                if opening:
                    out["content"].append(opening)
                self._buf = self._buf[end + len(MESSAGE):]
                self._header = None
                continue
            cut = min((i for i in (self._buf.find(m) for m in ENDS) if i >= 0), default=-1)
            if cut < 0:
                keep = 0 if final else partial_suffix(self._buf, MARKERS)
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                if text:
                    out[self._target].append(text)
                break
            if cut:
                out[self._target].append(self._buf[:cut])
            if self._calling:
                out["content"].append(CALL_END)
                self._calling = False
            marker = next(m for m in ENDS if self._buf.startswith(m, cut))
            self._buf = self._buf[cut + (0 if marker == START else len(marker)):]
            self._header = ""  # the next message's header follows
        if final and self._calling and not self._buf:  # the call's <|call|> ended the output (a stop token)
            out["content"].append(CALL_END)
            self._calling = False
        return "".join(out["reasoning"]), "".join(out["content"])

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        return False
