"""Reasoning parsers: `ReasoningParser` (the base class, one instance per sequence) and
`TagReasoningParser`, which splits ``<think>...</think>``-style blocks from the answer while
streaming."""

from __future__ import annotations

import copy

from mistralrs.parse_toolkit import Trimmer, partial_suffix


class ReasoningParser:
    """Base class of reasoning parsers. One instance per sequence.

    `starts_in_reasoning=True` when the chat template already put the opening tag in the
    prompt (Qwen3-Thinking, DeepSeek-R1 style), so the output begins inside the reasoning.
    """

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self.starts_in_reasoning = starts_in_reasoning
        self.reset()

    def reset(self) -> None:
        pass

    def feed(self, delta: str) -> tuple[str, str]:
        """Streaming: return (reasoning delta, content delta) safe to emit now."""
        raise NotImplementedError

    def finish(self) -> tuple[str, str]:
        """End of generation: flush what is held back. An unclosed block is reasoning."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, str]:
        """The whole output: (reasoning_content or None if there is none, content).
        Does not disturb this instance's streaming state."""
        clone = copy.copy(self)
        clone.reset()
        r1, c1 = clone.feed(text)
        r2, c2 = clone.finish()
        reasoning = r1 + r2
        return (reasoning or None), c1 + c2

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        """Whether a rendered prompt ends inside an open reasoning block (so the parser
        should be built with ``starts_in_reasoning=True``)."""
        return False


class TagReasoningParser(ReasoningParser):
    """Reasoning between an open and a close tag (``<think>`` / ``</think>`` by default).

    Text before the open tag and after the close tag is content; several blocks are joined
    with a newline; an unclosed block at the end is reasoning. Whitespace just inside the
    tags is dropped, and so is whitespace outside them that would begin or end the
    content (``<think>...</think>\\n\\nAnswer`` gives ``Answer``). When starting in
    reasoning, a repeated open tag at the very start of the output is dropped.
    """

    open_tag: str = "<think>"
    close_tag: str = "</think>"

    def reset(self) -> None:
        self._buf = ""
        self._in = self.starts_in_reasoning
        self._maybe_open = self.starts_in_reasoning
        self._reasoning = Trimmer(touching=self.starts_in_reasoning, joiner="\n")
        self._content = Trimmer()

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._process(final=False)

    def finish(self) -> tuple[str, str]:
        return self._process(final=True)

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        opened = prompt.rfind(cls.open_tag)
        return opened >= 0 and opened > prompt.rfind(cls.close_tag)

    def _process(self, *, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._buf
        while True:
            if self._in:
                if self._maybe_open:
                    stripped = buf.lstrip()
                    if stripped.startswith(self.open_tag):
                        buf = stripped[len(self.open_tag):]
                        self._maybe_open = False
                        continue
                    if self.open_tag.startswith(stripped) and not final:
                        break
                    self._maybe_open = False
                end = buf.find(self.close_tag)
                if end < 0:
                    keep = 0 if final else partial_suffix(buf, (self.close_tag,))
                    reasoning.append(self._reasoning.text(buf[:len(buf) - keep]))
                    buf = buf[len(buf) - keep:]
                    break
                reasoning.append(self._reasoning.text(buf[:end]))
                self._reasoning.boundary()
                self._content.boundary()
                buf = buf[end + len(self.close_tag):]
                self._in = False
            else:
                start = buf.find(self.open_tag)
                if start < 0:
                    keep = 0 if final else partial_suffix(buf, (self.open_tag,))
                    content.append(self._content.text(buf[:len(buf) - keep]))
                    buf = buf[len(buf) - keep:]
                    break
                content.append(self._content.text(buf[:start]))
                self._content.boundary()
                self._reasoning.boundary()
                buf = buf[start + len(self.open_tag):]
                self._in = True
        self._buf = buf
        if final:
            if self._in:
                self._reasoning.boundary()
            reasoning.append(self._reasoning.flush())
            content.append(self._content.flush())
        return "".join(reasoning), "".join(content)

