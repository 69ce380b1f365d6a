"""The plan of one chat request (`prepare_chat(service, body, config)` -> `ChatPlan`): its
messages, the tools offered and `tool_choice`, the constraint (the request's own or a grammar
forcing a tool call), the output parsers, and the engine request; `advance` appends one
server-side call of the tool loop and builds the next round's request. See
`mistralrs.tool_calling` for the whole picture."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mistralrs import json_input
from mistralrs.engine.grammar_specs import GrammarSpec, grammar_from_request
from mistralrs.errors import InvalidRequest
from mistralrs.output_pipeline import OutputPipeline, ParsedChoice
from mistralrs.request_validation import CHAT_TEMPLATE_KWARGS, generation_request, normalize_messages
from mistralrs.response_types import ROUND_SEPARATOR, AgenticToolCallRecord
from mistralrs.tool_choice import (
    ToolChoice,
    ToolConfig,
    max_tool_rounds_of,
    normalize_tools,
    resolve_tool_choice,
)
from mistralrs.tool_grammar import (
    added_tokens,
    arguments_schema,
    is_special_token,
    split_render,
    tool_call_grammar,
)

log = logging.getLogger("mistralrs.tools")


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
    from mistralrs.parser_selection import select_reasoning_parser, select_tool_parser

    registry = _registry_of(service)
    kw = dict(model_type=_model_type(service), chat_template=_template_text(service))
    tool = select_tool_parser(registry, override=config.tool_parser if config else None, **kw)
    reasoning = select_reasoning_parser(registry, override=config.reasoning_parser if config else None, **kw)
    return tool, reasoning


class ChatPlan:
    """Everything one chat request needs beyond the engine request (see the module doc)."""

    def __init__(self, service: Any, body: Mapping[str, Any], config: ToolConfig | None = None) -> None:
        from mistralrs.parser_selection import make_tool_parser

        self.service = service
        self.body = body
        self.config = config or ToolConfig()
        self.images: list[Any] = []
        processor = getattr(service, "processor", None)
        if processor is not None:  # a vision model: image parts load here, once per request
            from mistralrs.multimodal.images import load_image
            from mistralrs.multimodal.messages import pull_images

            messages, sources = pull_images(body.get("messages"))
            self.messages = normalize_messages(messages, image_parts=True)
            limit = getattr(processor, "max_images", None)
            if limit is not None and len(sources) > limit:
                raise InvalidRequest(f"{len(sources)} images is more than this model's limit of {limit}", "messages")
            self.images = [load_image(src) for src in sources]
        else:
            self.messages = normalize_messages(body.get("messages"))
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
        toolbox += self._search_tools(body.get("web_search_options"), client_names)
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

    def _search_tools(self, value: Any, client_names: list[str]) -> list[dict[str, Any]]:
        """``web_search_options``: the web-search tools, run server-side with this request's
        options (a per-request copy of the tool config carries their calls)."""
        if value is None or not self.max_rounds:
            return []
        if self.config.search is None:
            raise InvalidRequest("web_search_options: web search is not enabled; start the server with --enable-search "
                                 "(Runner(enable_search=True))", "web_search_options")
        import attrs

        from mistralrs.web_search.options import parse_web_search_options

        bound = self.config.search.for_request(parse_web_search_options(value), getattr(self.service, "tokenizer", None))
        self.config = attrs.evolve(self.config, callbacks={**self.config.callbacks, **bound.callbacks})
        return [t for t in bound.tools if t["function"]["name"] not in client_names]

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
        service = self.service
        tools = self.tools or None
        self.prompt = service.render_chat(self.messages, tools=tools, **self.template_kwargs)
        mm: tuple[Any, ...] = ()
        if getattr(service, "processor", None) is not None:
            ids, mm = service.processor.process(self.prompt, self.images)
        else:
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
            before, after = split_render(proto, "f")
            markers += [t for t in added_tokens(service.tokenizer) if t and (t in before or t in after)]
        if self.reasoning_spec is not None:
            from mistralrs.specs import resolve

            cls = resolve(self.reasoning_spec.parser)
            markers += [m for m in (getattr(cls, "open_tag", None), getattr(cls, "close_tag", None)) if m]
        # Markers that are special tokens must survive detokenization for the parsers to see them.
        skip_special = not any(is_special_token(service.tokenizer, m) for m in markers)
        request = generation_request(service, self.body, ids, grammar=self._grammar(reasoning_close),
                                     skip_special_tokens=skip_special)
        if mm:
            if len(request.prompt_ids) != len(ids):
                raise InvalidRequest("truncate_sequence cannot shorten a prompt with images; send fewer or smaller "
                                     "images or less text", "truncate_sequence")
            import attrs

            request = attrs.evolve(request, mm=mm)
        return request

    # -- parsing --------------------------------------------------------------------------
    def new_pipeline(self) -> OutputPipeline:
        from mistralrs.parser_selection import make_reasoning_parser, make_tool_parser

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
        call = parsed.server_call
        record = AgenticToolCallRecord(round=self.rounds_done, name=call.name, arguments=call.arguments,
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
