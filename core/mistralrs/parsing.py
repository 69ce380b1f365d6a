"""Tool-call and reasoning parsers: turn a model's generated text into OpenAI fields.

Two kinds of parser, both pure text processing and both streaming-capable, one instance
per sequence:

- `ToolCallParser` splits the output into plain ``content`` and ``tool_calls``
  (`ToolCall` = id, function name, arguments as a JSON *string*, the OpenAI shape).
- `ReasoningParser` splits ``reasoning_content`` (``<think>...</think>`` and the like) from
  the answer ``content``.

Parsers are plugins (`register_tool_parsers` / `register_reasoning_parsers`, specs
`ToolCallParserSpec` / `ReasoningParserSpec`); `select_tool_parser` and
`select_reasoning_parser` pick one for a model. In a pipeline the reasoning parser runs
first, and its *content* stream feeds the tool-call parser (tool calls are never looked
for inside reasoning).

Streaming contract (what the tests check for every parser and every way of splitting an
output into deltas): the content deltas returned by `feed`/`finish` concatenate to
``parse(text).content``, and the tool-call deltas merged by index (`merge_tool_call_deltas`)
equal ``parse(text).tool_calls`` (up to the generated ids). Text that may be the start of a
tool call is held back until it is decided, then released as content if it was not one.
Malformed tool-call syntax is never an error: it stays in the content, verbatim.

Writing a tool-call parser: subclass `ToolCallParser`, list the texts that open a call in
`start_markers`, and implement `parse_region(marker, cursor)` with the `Cursor` helpers;
the base class does buffering, holding back, whitespace and deltas. (A parser may instead
override `feed`/`finish`/`parse` wholesale; those three methods are the contract.)

The pieces live in smaller modules, all re-exported here: `mistralrs.parsed_calls` (results
and JSON helpers), `mistralrs.parse_toolkit` (Cursor and friends), `mistralrs.tool_parser`
(the ToolCallParser driver), `mistralrs.reasoning_parser` and `mistralrs.parser_selection`.
"""

from __future__ import annotations

from mistralrs.parse_toolkit import Cursor, NeedMore, Reject
from mistralrs.parsed_calls import (
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    calls_from_json,
    merge_tool_call_deltas,
    new_tool_call_id,
    normalize_arguments,
)
from mistralrs.parser_selection import (
    FALLBACK_TOOL_PARSER,
    TemplateMarkers,
    make_reasoning_parser,
    make_tool_parser,
    select_reasoning_parser,
    select_tool_parser,
)
from mistralrs.reasoning_parser import ReasoningParser, TagReasoningParser
from mistralrs.tool_parser import ToolCallParser

__all__ = [
    "FALLBACK_TOOL_PARSER",
    "Cursor",
    "NeedMore",
    "ParsedOutput",
    "ReasoningParser",
    "Reject",
    "TagReasoningParser",
    "TemplateMarkers",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "calls_from_json",
    "make_reasoning_parser",
    "make_tool_parser",
    "merge_tool_call_deltas",
    "new_tool_call_id",
    "normalize_arguments",
    "select_reasoning_parser",
    "select_tool_parser",
]
