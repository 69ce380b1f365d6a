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
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, AsyncIterator

import attrs

from mistralrs import json_input
from mistralrs.errors import InvalidRequest

log = logging.getLogger("mistralrs.tools")

DEFAULT_MAX_TOOL_ROUNDS = 8
ROUND_SEPARATOR = "\n\n"  # between the texts of two rounds of the tool loop
MAX_TOOL_ROUNDS_CAP = 256

# JSON written inside a forced tool call: compact, with the separators models are trained on.
_CALL_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ARGS_SENTINEL = "\x00MISTRALRS_ARGUMENTS\x00"


# --------------------------------------------------------------------------------------
# Configuration shared by every request of a frontend
# --------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class ToolConfig:
    """Frontend-wide tool settings: parser overrides, server-side tools and the round cap.

    `callbacks` maps a tool name to `fn(name, arguments: dict) -> str`; a callback runs when
    the model calls a tool of that name that the request declares in `tools`. `toolbox`
    (a `mistralrs.tools.Toolbox`) provides tools of its own: they are offered to the model
    in every request (unless `tool_choice` is "none") and executed server-side."""

    tool_parser: str | None = None
    reasoning_parser: str | None = None
    callbacks: Mapping[str, Callable[[str, dict[str, Any]], Any]] = attrs.field(factory=dict)
    toolbox: Any = None
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.max_tool_rounds, int) or not 0 <= self.max_tool_rounds:
            raise InvalidRequest(f"max_tool_rounds must be an integer >= 0, got {self.max_tool_rounds!r}",
                                 "max_tool_rounds")
        self.max_tool_rounds = min(self.max_tool_rounds, MAX_TOOL_ROUNDS_CAP)
        for name, fn in self.callbacks.items():
            if not callable(fn):
                raise InvalidRequest(f"tool callback {name!r} is not callable", "tool_callbacks")

    def toolbox_tools(self) -> list[dict[str, Any]]:
        return list(self.toolbox.list_tools()) if self.toolbox is not None else []

    def call(self, name: str, arguments: str) -> str:
        """Run a server-side tool; errors become the result text (the model sees them)."""
        try:
            args = json_input.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return f"error: the arguments are not valid JSON ({exc.msg})"
        try:
            if name in self.callbacks:
                result = self.callbacks[name](name, args)
            elif self.toolbox is not None:
                result = self.toolbox.call(name, args)
            else:  # pragma: no cover - callers only call known tools
                return f"error: unknown tool {name!r}"
        except Exception as exc:  # noqa: BLE001 - a failing tool is reported to the model
            log.warning("tool %s failed: %s: %s", name, type(exc).__name__, exc)
            return f"error: {type(exc).__name__}: {exc}"
        if result is None:
            return ""
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


# --------------------------------------------------------------------------------------
# tools and tool_choice
# --------------------------------------------------------------------------------------
def normalize_tools(value: Any, *, param: str = "tools") -> list[dict[str, Any]]:
    """Function tools in the nested chat form `{"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}`; the Responses flat form is accepted too."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest("tools must be a list of function tools", param)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            raise InvalidRequest(f"tools[{i}] must be an object", param)
        kind = tool.get("type", "function")
        if kind != "function":
            raise InvalidRequest(f"tools[{i}] has type {kind!r}; only function tools are supported", param)
        fn = tool.get("function")
        if fn is None:
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        if not isinstance(fn, Mapping):
            raise InvalidRequest(f"tools[{i}].function must be an object", param)
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest(f"tools[{i}] needs a function name (a non-empty string)", param)
        if name in seen:
            raise InvalidRequest(f"tools[{i}]: the function name {name!r} is declared twice", param)
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", param)
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(f"tools[{i}].function.strict must be true or false", param)
        clean: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            clean["description"] = fn["description"]
        if params is not None:
            clean["parameters"] = dict(params)
        if strict is not None:
            clean["strict"] = strict
        out.append({"type": "function", "function": clean})
    return out


@attrs.frozen
class ToolChoice:
    """`mode` is "none", "auto" or "required"; `names` the tools that may be called (None:
    all offered tools)."""

    mode: str
    names: tuple[str, ...] | None = None


def _choice_name(item: Any, where: str) -> str:
    if isinstance(item, Mapping):
        if item.get("type", "function") != "function":
            raise InvalidRequest(f"{where} has type {item.get('type')!r}; only function tools can be chosen",
                                 "tool_choice")
        fn = item.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else item.get("name")
        if isinstance(name, str) and name:
            return name
    raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{"name": ...}}}} '
                         '(or {"type": "function", "name": ...})', "tool_choice")


def resolve_tool_choice(value: Any, available: Sequence[str]) -> ToolChoice:
    """Validate `tool_choice` against the names of the offered tools."""
    names = list(available)
    if value is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(value, str):
        mode = value.strip().lower()
        if mode not in ("none", "auto", "required"):
            raise InvalidRequest(f'tool_choice must be "none", "auto", "required" or a function, got {value!r}',
                                 "tool_choice")
        if mode == "required" and not names:
            raise InvalidRequest('tool_choice "required" needs at least one tool in `tools`', "tool_choice")
        return ToolChoice(mode if names or mode == "none" else "none")
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"tool_choice must be a string or an object, got {type(value).__name__}", "tool_choice")
    if value.get("type") == "allowed_tools":
        inner = value.get("allowed_tools")
        spec: Mapping[str, Any] = inner if isinstance(inner, Mapping) else value
        mode = spec.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise InvalidRequest(f'tool_choice.mode must be "auto" or "required", got {mode!r}', "tool_choice")
        listed = spec.get("tools")
        if not isinstance(listed, list) or not listed:
            raise InvalidRequest("tool_choice.tools must be a non-empty list of functions", "tool_choice")
        chosen = [_choice_name(t, f"tool_choice.tools[{i}]") for i, t in enumerate(listed)]
        for name in chosen:
            if name not in names:
                raise InvalidRequest(f"tool_choice allows {name!r}, which is not among the declared tools "
                                     f"({', '.join(names) or 'none'})", "tool_choice")
        return ToolChoice(mode, tuple(dict.fromkeys(chosen)))
    name = _choice_name(value, "tool_choice")
    if name not in names:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the declared tools "
                             f"({', '.join(names) or 'none'})", "tool_choice")
    return ToolChoice("required", (name,))


def max_tool_rounds_of(body: Mapping[str, Any], default: int) -> int:
    value = body.get("max_tool_rounds")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"max_tool_rounds must be an integer >= 0, got {value!r}", "max_tool_rounds")
    return min(value, MAX_TOOL_ROUNDS_CAP)


# --------------------------------------------------------------------------------------
# Grammars that force a tool call
# --------------------------------------------------------------------------------------
def arguments_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema a forced call's arguments follow: the function's `parameters` (any
    object when absent). Keys the schema does not list are not allowed unless it says so
    (`additionalProperties`), as OpenAI's strict mode requires."""
    params = tool["function"].get("parameters")
    schema = dict(params) if params else {"type": "object"}
    if isinstance(schema.get("properties"), Mapping):
        schema.setdefault("additionalProperties", False)
    return schema


def _lark_literal(text: str, added: Mapping[str, int]) -> str:
    """`text` as a sequence of Lark terminals. Added tokens (``<tool_call>``, ``[TOOL_CALLS]``,
    ``<|python_tag|>`` ...) are referenced by id (``<[id]>``): llguidance matches added tokens
    only as tokens, never as the text they spell."""
    if not text:
        return ""
    markers = sorted((t for t in added if t and t in text), key=len, reverse=True)
    if not markers:
        return json.dumps(text, ensure_ascii=False)
    parts = re.split("(" + "|".join(re.escape(m) for m in markers) + ")", text)
    out = []
    for part in parts:
        if not part:
            continue
        out.append(f"<[{added[part]}]>" if part in added else json.dumps(part, ensure_ascii=False))
    return " ".join(out)


def _split_render(parser: Any, name: str) -> tuple[str, str]:
    """(text before the arguments, text after them) of one call in the parser's format."""
    text = parser.render_call(name, _ARGS_SENTINEL)
    if text.count(_ARGS_SENTINEL) != 1:  # pragma: no cover - a parser that reshapes arguments
        text = json.dumps({"name": name, "arguments": None}).replace("null", _ARGS_SENTINEL)
    before, after = text.split(_ARGS_SENTINEL)
    return before, after


def _json_term(schema: Mapping[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _CALL_JSON_STYLE})


def _added_tokens(tokenizer: Any) -> dict[str, int]:
    added = getattr(tokenizer, "added_tokens", None)
    return dict(added) if isinstance(added, Mapping) else {}


def tool_call_grammar(
    parser: Any,
    tools: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    forced: bool,
    strict_only: bool = False,
    reasoning_close: str | None = None,
) -> str:
    """A Lark grammar (llguidance dialect) over the parser family's call syntax.

    `forced`: the output is exactly one call to one of `tools`, its arguments following the
    tool's schema (`tool_choice` "required" or a named function). Otherwise (`auto` with
    strict functions): free text in which every call, once its start marker appears, is a
    well-formed call to a declared tool; with `strict_only` only strict functions have their
    arguments checked against their schema (the others take any JSON object).
    `reasoning_close`: the prompt left a reasoning block open; the model may reason freely
    until this close tag, then the grammar applies."""
    added = _added_tokens(tokenizer)
    lines = ["%llguidance {}"]
    alternatives = []
    trigger: str | None = None
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        before, after = _split_render(parser, name)
        strict = bool(tool["function"].get("strict")) or not strict_only
        schema = arguments_schema(tool) if strict else {"type": "object"}
        if not forced:
            stripped = before.lstrip()
            markers = tuple(getattr(parser, "start_markers", ()) or ())
            lead = next((m for m in markers if stripped.startswith(m)), None)
            if lead is not None:
                trigger, before = lead, stripped[len(lead):]
            elif markers:
                trigger, before = markers[0], "\n" + stripped
                if trigger.startswith("```"):
                    after = after + "\n```"
            else:
                raise InvalidRequest(f"the {parser.name!r} tool-call format has no start marker to enforce "
                                     "strict functions with; use tool_choice \"required\"", "tools")
        body = " ".join(p for p in (_lark_literal(before, added), _json_term(schema), _lark_literal(after, added)) if p)
        lines.append(f"call_{i}: {body}")
        alternatives.append(f"call_{i}")
    calls = " | ".join(alternatives)
    if forced:
        if reasoning_close:
            close = _lark_literal(reasoning_close, added)
            if reasoning_close in added:
                lines.insert(1, f"start: REASONING {close} \"\\n\\n\" ({calls})")
            else:
                lines.insert(1, f"start: reasoning \"\\n\\n\" ({calls})")
                lines.append(f"reasoning[lazy]: REASONING {close}")
            lines.append("REASONING: /(.|\\n)*/")
        else:
            lines.insert(1, f"start: {calls}")
        return "\n".join(lines)
    assert trigger is not None
    trig = _lark_literal(trigger, added)
    lines.insert(1, "start: tag* TEXT")
    if trigger in added:
        lines.append(f"tag: TEXT {trig} ({calls})")
    else:
        lines.append(f"tag_trigger[lazy]: TEXT {trig}")
        lines.append(f"tag: tag_trigger ({calls})")
    lines.append("TEXT: /(.|\\n)*/")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Output pipeline: reasoning parser -> tool-call parser -> call filter
# --------------------------------------------------------------------------------------
@attrs.frozen
class ParsedChoice:
    """One choice's output, split: `calls` are the client-visible tool calls (OpenAI
    shape, ids `call-<uuid>`), `server_call` the server-side call the tool loop runs."""

    content: str
    reasoning: str | None
    calls: tuple[Any, ...] = ()
    server_call: Any = None


class OutputPipeline:
    """Streaming split of one choice's text into reasoning, content and tool calls.

    `feed(text)` / `finish()` return `(reasoning, content, tool_call_deltas)`; the deltas
    are `parsing.ToolCallDelta`s renumbered over the client-visible calls only. A call to
    an undeclared tool is dropped (as mistral.rs does). The first call of the output is
    kept back as `server_call` when it is a server-side tool (and then every later call of
    the output is dropped: the tool loop continues after it)."""

    def __init__(self, *, reasoning: Any = None, tools: Any = None, client_names: Sequence[str] = (),
                 server_names: Sequence[str] = ()) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.client_names = frozenset(client_names)
        self.server_names = frozenset(server_names)
        self.calls: list[Any] = []
        self.server_call: Any = None
        self._seen_call = False
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def _filter(self, deltas: Sequence[Any]) -> list[Any]:
        from mistralrs.parsing import ToolCall, ToolCallDelta

        out = []
        for d in deltas:
            if self.server_call is not None:
                continue  # the loop continues after the server-side call: the rest is dropped
            if d.name in self.server_names and not self._seen_call:
                self.server_call = ToolCall(id=d.id or "", name=d.name, arguments=d.arguments)
            elif d.name in self.client_names:
                index = len(self.calls)
                self.calls.append(ToolCall(id=d.id or "", name=d.name, arguments=d.arguments))
                out.append(ToolCallDelta(index, d.id, d.name, d.arguments))
            else:
                log.info("dropping a call to the undeclared tool %r", d.name)
                continue
            self._seen_call = True
        return out

    def _run(self, text: str | None) -> tuple[str, str, list[Any]]:
        final = text is None
        if self.reasoning is not None:
            r, c = self.reasoning.finish() if final else self.reasoning.feed(text)
        else:
            r, c = "", ("" if final else text)
        deltas: list[Any] = []
        if self.tools is not None:
            content, deltas = self.tools.feed(c) if c else ("", [])
            if final:
                tail, more = self.tools.finish()
                content, deltas = content + tail, deltas + more
            c = content
        self._reasoning_parts.append(r)
        self._content_parts.append(c)
        return r, c, self._filter(deltas)

    def feed(self, text: str) -> tuple[str, str, list[Any]]:
        return self._run(text)

    def finish(self) -> tuple[str, str, list[Any]]:
        return self._run(None)

    def result(self) -> ParsedChoice:
        reasoning = "".join(self._reasoning_parts)
        return ParsedChoice("".join(self._content_parts), reasoning or None, tuple(self.calls), self.server_call)

    def parse(self, text: str) -> ParsedChoice:
        self.feed(text)
        self.finish()
        return self.result()


# --------------------------------------------------------------------------------------
# The plan of a chat request
# --------------------------------------------------------------------------------------
CHAT_TEMPLATE_KWARGS = ("enable_thinking", "reasoning_effort")


def _template_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {k: body.get(k) for k in CHAT_TEMPLATE_KWARGS}
    extra = body.get("chat_template_kwargs")
    if extra is not None and not isinstance(extra, Mapping):
        raise InvalidRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
    for k, v in (extra or {}).items():
        if k in CHAT_TEMPLATE_KWARGS:
            if kwargs.get(k) is None:
                kwargs[k] = v
        else:
            log.warning("chat_template_kwargs.%s is not passed to the template (only %s are)", k,
                        ", ".join(CHAT_TEMPLATE_KWARGS))
    effort = kwargs.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise InvalidRequest("reasoning_effort must be a string", "reasoning_effort")
        kwargs["reasoning_effort"] = effort.strip().lower()
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise InvalidRequest("enable_thinking must be true or false", "enable_thinking")
    return kwargs


def _registry_of(service: Any) -> Any:
    registry = getattr(service, "registry", None)
    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    return registry


def _model_type(service: Any) -> str | None:
    config = getattr(getattr(service, "loaded", None), "config", None)
    return config.get("model_type") if isinstance(config, Mapping) else None


def _template_text(service: Any) -> str | None:
    templates = getattr(getattr(service, "chat_template", None), "templates", None)
    if isinstance(templates, Mapping) and templates:
        return "\n".join(str(t) for t in templates.values())
    return None


def parser_specs(service: Any, config: ToolConfig | None) -> tuple[Any, Any]:
    """(tool-call parser spec, reasoning parser spec or None) for a model."""
    from mistralrs.parsing import select_reasoning_parser, select_tool_parser

    registry = _registry_of(service)
    kw = dict(model_type=_model_type(service), chat_template=_template_text(service))
    tool = select_tool_parser(registry, override=config.tool_parser if config else None, **kw)
    reasoning = select_reasoning_parser(registry, override=config.reasoning_parser if config else None, **kw)
    return tool, reasoning


def _is_special(tokenizer: Any, text: str) -> bool:
    added = _added_tokens(tokenizer)
    special = getattr(tokenizer, "special_ids", None) or frozenset()
    return text in added and added[text] in special


class ChatPlan:
    """Everything one chat request needs beyond the engine request (see the module doc)."""

    def __init__(self, service: Any, body: Mapping[str, Any], config: ToolConfig | None = None) -> None:
        from mistralrs import protocol as P
        from mistralrs.engine.constraints import grammar_from_request
        from mistralrs.parsing import make_tool_parser

        self.service = service
        self.body = body
        self.config = config or ToolConfig()
        self.messages = P.normalize_messages(body.get("messages"))
        self.client_tools = normalize_tools(body.get("tools"))
        self.template_kwargs = _template_kwargs(body)
        self.user_grammar = grammar_from_request(body)
        n = body.get("n", 1)
        self.max_rounds = max_tool_rounds_of(body, self.config.max_tool_rounds) if n in (1, None) else 0
        client_names = [t["function"]["name"] for t in self.client_tools]
        # Server-side tools: callbacks for declared tools, and the toolbox's own tools.
        self.callback_names = tuple(c for c in client_names if c in self.config.callbacks) if self.max_rounds else ()
        toolbox = [t for t in self.config.toolbox_tools() if t["function"]["name"] not in client_names] \
            if self.max_rounds else []
        self.toolbox_tools = normalize_tools(toolbox, param="tools") if toolbox else []
        all_names = client_names + [t["function"]["name"] for t in self.toolbox_tools]
        self.initial_choice = resolve_tool_choice(body.get("tool_choice"), all_names)
        self.choice = self.initial_choice
        if self.choice.mode == "required" and self.user_grammar is not None:
            raise InvalidRequest(f"tool_choice {body.get('tool_choice')!r} forces a tool call and cannot be combined "
                                 f"with `{self.user_grammar.param}`", "tool_choice")
        self.tool_spec, self.reasoning_spec = parser_specs(service, self.config)
        self._tool_parser_proto = make_tool_parser(self.tool_spec)
        self.rounds_done = 0
        self.records: list[Any] = []
        self.round_contents: list[str] = []  # text the model wrote before each server-side call
        self._check_tool_schemas()
        self.request = self._build()

    # -- what is offered ------------------------------------------------------------------
    @property
    def tools(self) -> list[dict[str, Any]]:
        """The tools rendered into the prompt (none with tool_choice "none")."""
        if self.choice.mode == "none":
            return []
        return self.client_tools + self.toolbox_tools

    @property
    def parsing_tools(self) -> bool:
        return bool(self.tools)

    def _may_call(self, name: str) -> bool:
        return self.choice.names is None or name in self.choice.names

    @property
    def server_names(self) -> tuple[str, ...]:
        """Tools the loop executes in the current round (none once the round cap is hit)."""
        if self.rounds_done >= self.max_rounds or not self.parsing_tools:
            return ()
        names = self.callback_names + tuple(t["function"]["name"] for t in self.toolbox_tools)
        return tuple(n for n in names if self._may_call(n))

    @property
    def client_names(self) -> tuple[str, ...]:
        """Tools whose calls are returned to the client."""
        if not self.parsing_tools:
            return ()
        server = set(self.callback_names) | {t["function"]["name"] for t in self.toolbox_tools}
        return tuple(t["function"]["name"] for t in self.client_tools
                     if t["function"]["name"] not in server and self._may_call(t["function"]["name"]))

    def _allowed_tools(self) -> list[dict[str, Any]]:
        names = self.choice.names
        return [t for t in self.tools if names is None or t["function"]["name"] in names]

    def _check_tool_schemas(self) -> None:
        """A bad schema of a function that a grammar will enforce is the client's 400."""
        from mistralrs.engine.constraints import GrammarSpec

        engine = getattr(self.service, "engine", None)
        factory = getattr(engine, "constraint_factory", None)
        if factory is None:
            return
        enforced = self._allowed_tools() if self.choice.mode == "required" else [
            t for t in self.tools if t["function"].get("strict")]
        for tool in enforced:
            try:
                factory().compile(GrammarSpec("json_schema", arguments_schema(tool), "tools"))
            except InvalidRequest as exc:
                raise InvalidRequest(f"function {tool['function']['name']!r}: {exc}", "tools") from None

    # -- the engine request ---------------------------------------------------------------
    def _grammar(self, reasoning_close: str | None) -> Any:
        from mistralrs.engine.constraints import GrammarSpec

        if self.user_grammar is not None or not self.parsing_tools:
            return self.user_grammar
        tokenizer = self.service.tokenizer
        if self.choice.mode == "required":
            text = tool_call_grammar(self._tool_parser_proto, self._allowed_tools(), tokenizer, forced=True,
                                     reasoning_close=reasoning_close)
            return GrammarSpec("lark", text, "tools")
        if self.choice.mode == "auto" and any(t["function"].get("strict") for t in self.tools):
            allowed = self._allowed_tools()
            text = tool_call_grammar(self._tool_parser_proto, allowed, tokenizer, forced=False, strict_only=True)
            return GrammarSpec("lark", text, "tools")
        return None

    def _build(self) -> Any:
        from mistralrs import protocol as P

        service = self.service
        tools = self.tools or None
        self.prompt = service.render_chat(self.messages, tools=tools, **self.template_kwargs)
        ids = service.encode_prompt(self.prompt, add_special_tokens=False,
                                    truncating=bool(self.body.get("truncate_sequence")))
        self.starts_in_reasoning = False
        reasoning_close = None
        if self.reasoning_spec is not None:
            from mistralrs.specs import resolve

            cls = resolve(self.reasoning_spec.parser)
            self.starts_in_reasoning = bool(cls.prompt_opens_reasoning(self.prompt))
            if self.starts_in_reasoning:
                reasoning_close = getattr(cls, "close_tag", None)
        markers: list[str] = []
        if self.parsing_tools:
            proto = self._tool_parser_proto
            markers += list(getattr(proto, "start_markers", ()))
            before, after = _split_render(proto, "f")
            markers += [t for t in _added_tokens(service.tokenizer) if t and (t in before or t in after)]
        if self.reasoning_spec is not None:
            from mistralrs.specs import resolve

            cls = resolve(self.reasoning_spec.parser)
            markers += [m for m in (getattr(cls, "open_tag", None), getattr(cls, "close_tag", None)) if m]
        # Markers that are special tokens must survive detokenization for the parsers to see them.
        skip_special = not any(_is_special(service.tokenizer, m) for m in markers)
        return P._generation_request(service, self.body, ids, grammar=self._grammar(reasoning_close),
                                     skip_special_tokens=skip_special)

    # -- parsing --------------------------------------------------------------------------
    def new_pipeline(self) -> OutputPipeline:
        from mistralrs.parsing import make_reasoning_parser, make_tool_parser

        reasoning = None
        if self.reasoning_spec is not None:
            reasoning = make_reasoning_parser(self.reasoning_spec, starts_in_reasoning=self.starts_in_reasoning)
        tools = make_tool_parser(self.tool_spec) if self.parsing_tools else None
        return OutputPipeline(reasoning=reasoning, tools=tools, client_names=self.client_names,
                              server_names=self.server_names)

    def parse(self, text: str) -> ParsedChoice:
        return self.new_pipeline().parse(text)

    def full_content(self, content: str) -> str:
        """The content of the whole turn: what the model wrote in earlier rounds of the tool
        loop (before each server-side call), then `content`, separated by blank lines (as
        streaming sends it)."""
        return ROUND_SEPARATOR.join([*self.round_contents, content] if content else self.round_contents)

    @property
    def active(self) -> bool:
        """Whether outputs need parsing at all (tools offered, or a reasoning model)."""
        return self.parsing_tools or self.reasoning_spec is not None

    # -- the tool loop ----------------------------------------------------------------------
    def advance(self, parsed: ParsedChoice, result: str) -> Any:
        """Append the round's server-side call and its result; build the next request.
        `required` / named choices apply to the first round only."""
        from mistralrs import protocol as P

        call = parsed.server_call
        record = P.AgenticToolCallRecord(round=self.rounds_done, name=call.name, arguments=call.arguments,
                                         result_content=result)
        self.records.append(record)
        self.rounds_done += 1
        if parsed.content:
            self.round_contents.append(parsed.content)
        try:
            args: Any = json_input.loads(call.arguments)
        except ValueError:
            args = call.arguments
        self.messages = self.messages + [
            {"role": "assistant", "content": parsed.content or None,
             "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": args}}]},
            {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result},
        ]
        if self.choice.mode == "required":
            self.choice = ToolChoice("auto", None)
        self.request = self._build()
        return record


def prepare_chat(service: Any, body: Mapping[str, Any], config: ToolConfig | None = None) -> ChatPlan:
    """Validate a chat-completions body and plan it (see `ChatPlan`)."""
    return ChatPlan(service, body, config)


# --------------------------------------------------------------------------------------
# The tool loop over engine requests
# --------------------------------------------------------------------------------------
@attrs.frozen
class RoundBoundary:
    """Between two rounds of the tool loop: the server-side call of choice `index` ran."""

    index: int
    record: Any


def _sum_usage(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return attrs.evolve(
        b,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
        time_to_first_token=a.time_to_first_token,
        prompt_seconds=(a.prompt_seconds or 0.0) + (b.prompt_seconds or 0.0),
        completion_seconds=(a.completion_seconds or 0.0) + (b.completion_seconds or 0.0),
        total_seconds=a.total_seconds + b.total_seconds,
    )


class ToolLoop:
    """A request handle over the rounds of the tool loop: iterate (or async-iterate) it like
    an engine handle. Events are the engine's, except that a round ending in a server-side
    call yields a `RoundBoundary` instead of its `ChoiceFinished` / `RequestDone`, and the
    final `RequestDone` carries the usage summed over all rounds. `records` lists the
    executed calls. The first round is submitted at once (a bad request raises here)."""

    def __init__(self, plan: ChatPlan, submit: Callable[[Any], Any]) -> None:
        self.plan = plan
        self.submit = submit
        self.handle = submit(plan.request)
        self.request = plan.request
        self.id = getattr(self.handle, "id", None)
        self.cancelled = False
        self._usage: Any = None
        self._pending: Any = None  # (parsed choice, the swallowed ChoiceFinished)

    @property
    def done(self) -> bool:
        return bool(getattr(self.handle, "done", True)) and self._pending is None

    @property
    def records(self) -> list[Any]:
        return self.plan.records

    def cancel(self) -> None:
        self.cancelled = True
        self.handle.cancel()

    def _swallow(self, event: Any) -> bool:
        """A ChoiceFinished whose output ends in a server-side call: hold it back."""
        if type(event).__name__ == "ChoiceFinished" and event.index == 0 and not self.cancelled \
                and event.finish_reason in ("stop", "length") and self.plan.server_names:
            parsed = self.plan.parse(event.text)
            if parsed.server_call is not None:
                self._pending = (parsed, event)
                return True
        return False

    def _round_end(self, event: Any) -> list[Any] | None:
        """At a RequestDone: None to run the pending call and go on, else the final events."""
        self._usage = _sum_usage(self._usage, event.usage)
        if self._pending is not None and not self.cancelled:
            return None
        held = [self._pending[1]] if self._pending is not None else []
        self._pending = None
        return held + [attrs.evolve(event, usage=self._usage)]

    def __iter__(self) -> Iterator[Any]:
        while True:
            final: list[Any] | None = []
            for event in self.handle:
                if self._swallow(event):
                    continue
                if type(event).__name__ == "RequestDone":
                    final = self._round_end(event)
                    break
                yield event
            if final is not None:
                yield from final
                return
            parsed = self._pending[0]
            call = parsed.server_call
            result = self.plan.config.call(call.name, call.arguments)
            self._pending = None
            record = self.plan.advance(parsed, result)
            self.handle = self.submit(self.plan.request)
            self.request = self.plan.request
            yield RoundBoundary(0, record)

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                final: list[Any] | None = []
                async for event in self.handle:
                    if self._swallow(event):
                        continue
                    if type(event).__name__ == "RequestDone":
                        final = self._round_end(event)
                        break
                    yield event
                if final is not None:
                    for event in final:
                        yield event
                    return
                parsed = self._pending[0]
                call = parsed.server_call
                result = await asyncio.to_thread(self.plan.config.call, call.name, call.arguments)
                if self.cancelled:
                    held, self._pending = self._pending[1], None
                    yield attrs.evolve(held, finish_reason="canceled")
                    yield _cancelled_done(held, self._usage)
                    return
                self._pending = None
                record = await asyncio.to_thread(self.plan.advance, parsed, result)
                self.handle = self.submit(self.plan.request)
                self.request = self.plan.request
                yield RoundBoundary(0, record)
        finally:
            if not getattr(self.handle, "done", True):
                self.handle.cancel()


def _cancelled_done(choice: Any, usage: Any) -> Any:
    from mistralrs.engine.engine import RequestDone

    return RequestDone(usage, (attrs.evolve(choice, finish_reason="canceled"),))
