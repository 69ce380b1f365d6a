"""Tool calling, structured output and reasoning in the request path.

One chat request becomes a `ChatPlan` (`prepare_chat(service, body, config)`):

* `tools` are normalised to the nested OpenAI form and rendered into the chat template
  (not with `tool_choice: "none"`); `tool_choice` (`none`, `auto`, `required`, a named
  function, `allowed_tools`) is validated against them;
* the constraint of the request is chosen: `response_format` / `grammar`
  (`constraints.grammar_from_request`), or, for `required` / named choices and for strict
  functions, a grammar built here from the tool-call parser's own wire format
  (`ToolCallParser.render_call`) and the functions' JSON schemas, so the model can only
  write a parseable call to a declared tool with schema-valid arguments;
* the output parsers are selected (`parsing.select_tool_parser` /
  `select_reasoning_parser`, overridable with `ToolConfig.tool_parser` /
  `reasoning_parser`), and whether the prompt already opens a reasoning block;
* the engine request is built (`plan.request`).

`plan.new_pipeline()` gives one `OutputPipeline` per choice: the reasoning parser, then the
tool-call parser on the answer, then the call filter (calls to undeclared tools are
dropped; calls to server-side tools are kept for the tool loop, never shown to the client).

`ToolLoop` runs the server-side tool loop over engine requests: when the first call of a
round is a server-side tool (a `Runner(tool_callbacks=...)` callback for a tool the request
declares, or a tool of an enabled tool-source plugin), it is executed, the assistant call
and a `tool` message are appended, and generation continues, up to `max_tool_rounds`.
Between rounds it yields a `RoundBoundary` event; the other events are the engine's.

The pieces live in smaller modules, all re-exported here: `mistralrs.tool_choice` (ToolConfig,
tools, tool_choice), `mistralrs.tool_grammar` (grammars forcing a call),
`mistralrs.output_pipeline` (ParsedChoice, OutputPipeline), `mistralrs.chat_plan` (ChatPlan,
prepare_chat) and `mistralrs.tool_loop` (ToolLoop, RoundBoundary).
"""

from __future__ import annotations

from mistralrs.chat_plan import ChatPlan, parser_specs, prepare_chat
from mistralrs.output_pipeline import OutputPipeline, ParsedChoice
from mistralrs.request_validation import CHAT_TEMPLATE_KWARGS
from mistralrs.response_types import ROUND_SEPARATOR
from mistralrs.tool_choice import (
    DEFAULT_MAX_TOOL_ROUNDS,
    MAX_TOOL_ROUNDS_CAP,
    ToolChoice,
    ToolConfig,
    max_tool_rounds_of,
    normalize_tools,
    resolve_tool_choice,
)
from mistralrs.tool_grammar import arguments_schema, tool_call_grammar
from mistralrs.tool_loop import RoundBoundary, ToolLoop

__all__ = [
    "CHAT_TEMPLATE_KWARGS", "DEFAULT_MAX_TOOL_ROUNDS", "MAX_TOOL_ROUNDS_CAP", "ROUND_SEPARATOR", "ChatPlan",
    "OutputPipeline", "ParsedChoice", "RoundBoundary", "ToolChoice", "ToolConfig", "ToolLoop", "arguments_schema",
    "max_tool_rounds_of", "normalize_tools", "parser_specs", "prepare_chat", "resolve_tool_choice",
    "tool_call_grammar",
]
