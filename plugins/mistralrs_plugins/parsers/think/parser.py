"""Implementation of the ``<think>`` reasoning parser (registered in `__init__.py`)."""

from __future__ import annotations

from mistralrs.parsing import TagReasoningParser


class ThinkReasoningParser(TagReasoningParser):
    """``<think>reasoning</think>answer``. Build it with ``starts_in_reasoning=True`` when the
    prompt already ends in ``<think>`` (`prompt_opens_reasoning(prompt)` tells)."""

    name = "think"
    open_tag = "<think>"
    close_tag = "</think>"
