"""Chat templates: find a model's Jinja chat template and render conversations with it.

Rendering matches transformers' `tokenizer.apply_chat_template(..., tokenize=False)`
byte for byte: the same sandboxed Jinja environment (`ImmutableSandboxedEnvironment`,
`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a no-op `{% generation %}` tag), the same
globals (`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`) and
`tojson` filter, the same context (special tokens such as `bos_token`, extra keyword
arguments such as `enable_thinking`, `messages`, `tools`, `documents`,
`add_generation_prompt`) and the same message preprocessing (None-valued keys dropped,
reasoning fields aliased, `continue_final_message`). See docs/chat-templates.md.

This module must not import torch or transformers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError, TemplateError
from mistralrs.tokenization import read_json_file, special_tokens_map

__all__ = ["ChatTemplate", "compile_template", "render_template"]

MIN_JINJA2 = (3, 1, 6)  # older versions have known sandbox escapes

# Message keys that carry reasoning; the first is the one most templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _now() -> datetime:
    """The clock behind `strftime_now` (tests monkeypatch this)."""
    return datetime.now()


# --------------------------------------------------------------------------- compiling
def _jinja2_version_ok(version: str) -> bool:
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_JINJA2


@lru_cache(maxsize=64)
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not _jinja2_version_ok(jinja2.__version__):
        raise TemplateError(
            f"jinja2 {jinja2.__version__} is too old to run chat templates safely; "
            "upgrade it with pip install -U 'jinja2>=3.1.6'"
        )

    class GenerationTag(jinja2.ext.Extension):
        # transformers' AssistantTracker: `{% generation %}...{% endgeneration %}` marks
        # assistant text for training masks; for inference it just renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Unlike Jinja's own tojson: no HTML escaping, and json.dumps' options exposed.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return _now().strftime(format)

    class TemplateDict:
        # `dict(...)` without exposing the dict type itself to the template
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces reject underscore-prefixed attributes (no route to CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                    "Please rename the attribute."
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile_cached(source: str):
    return _environment().from_string(source)


def compile_template(source: str, *, origin: str = "<string>"):
    """Compile a chat template; a syntax error raises TemplateError naming `origin` and the line."""
    import jinja2

    if not isinstance(source, str):
        raise TemplateError(f"chat template from {origin} must be a string, got {type(source).__name__}; fix it")
    try:
        return _compile_cached(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"chat template from {origin} has a syntax error at line {exc.lineno}: {_one_line(exc.message)}; "
            "fix it or pass --chat-template FILE"
        ) from None


# --------------------------------------------------------------------------- context
def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types (copying them, so templates and
    the preprocessing below never touch the caller's objects). Like transformers'
    `_plain_template_data`: unknown objects become an inert "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    fields = getattr(type(value), "__attrs_attrs__", None)
    if fields is not None and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_template(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool | str = False,
    special_tokens: Mapping[str, str] | None = None,
    origin: str = "<string>",
    **extra: Any,
) -> str:
    """Render `messages` with a template string exactly like transformers'
    `apply_chat_template(tokenize=False)`. Errors raise TemplateError."""
    import jinja2

    compiled = compile_template(template, origin=origin)
    if not messages:
        raise TemplateError("cannot apply a chat template to an empty conversation; send at least one message")
    if continue_final_message and add_generation_prompt:
        raise TemplateError("continue_final_message and add_generation_prompt are not compatible; set only one of them")
    chat: list[dict] = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be objects with a role, got {message!r}")
        chat.append({k: v for k, v in message.items() if v is not None})
    if tools is not None:
        for tool in tools:
            if not isinstance(_plain(tool), dict):
                raise TemplateError(f"tools must be JSON schema objects, got {type(tool).__name__}")
    if documents is not None:
        for document in documents:
            if not isinstance(_plain(document), dict):
                raise TemplateError("documents must be objects with 'title' and 'text' keys")
    tools_data = _plain(list(tools)) if tools is not None else None
    documents_data = _plain(list(documents)) if documents is not None else None
    context = _plain({**(special_tokens or {}), **extra})
    for reserved in ("messages", "tools", "documents", "add_generation_prompt"):
        context.pop(reserved, None)

    chat = _alias_reasoning(chat)
    final_message: Any = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise TemplateError(
                f'continue_final_message is set but the final message has no "{field}" to continue; '
                "add it or turn continue_final_message off"
            )
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise TemplateError(
                f'continue_final_message is set to "{field}" but the chat template never reads that field; '
                "use another field or turn continue_final_message off"
            )
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if isinstance(block, dict) and "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise TemplateError("continue_final_message is set but the final message has no text part to continue")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG

    try:
        rendered = compiled.render(
            messages=chat,
            tools=tools_data,
            documents=documents_data,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except jinja2.TemplateError as exc:
        message = _one_line(getattr(exc, "message", None) or exc)
        err = TemplateError(f"chat template error: {message}")
        err.template_message = message  # type: ignore[attr-defined]
        raise err from None
    except TemplateError:
        raise
    except Exception as exc:  # TypeError, KeyError... raised inside the template
        raise TemplateError(
            f"chat template from {origin} failed while rendering ({type(exc).__name__}: {_one_line(exc)}); "
            "check the messages or pass --chat-template FILE"
        ) from None

    if continue_final_message:
        text = str(final_message).strip()
        if text not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise TemplateError(
                "continue_final_message is set but the chat template drops or rewrites the final message; "
                "it cannot be continued with this template"
            )
        loc = rendered.rindex(_CONTINUE_TAG.strip())
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:loc]
        else:
            rendered = rendered[:loc].rstrip()
    return rendered


# --------------------------------------------------------------------------- loading
def _templates_from_value(value: Any, origin: str) -> dict[str, str]:
    """`chat_template` as stored in JSON: a string, a list of {"name", "template"}, or a
    {name: template} object. Returns {name: template} ("default" for a single one)."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            if (
                not isinstance(item, Mapping)
                or not isinstance(item.get("name"), str)
                or not isinstance(item.get("template"), str)
            ):
                raise TemplateError(
                    f'{origin}: each chat_template entry needs string "name" and "template" keys; fix the file'
                )
            out[item["name"]] = item["template"]
        return out
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise TemplateError(
        f'{origin}: chat_template must be a string or a list of {{"name", "template"}} objects; fix the file'
    )


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"{what} {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read {what} {path}: {_one_line(exc)}; check the file") from None


def _read_json_templates(path: Path, what: str) -> tuple[dict[str, str], dict[str, str]]:
    """(templates, special tokens) of a tokenizer_config-like JSON file."""
    data = read_json_file(path, error=TemplateError, what=what)
    if not isinstance(data, dict):
        raise TemplateError(f'{what} {path} must hold a JSON object with a "chat_template" key; fix the file')
    if data.get("chat_template") is None:
        raise TemplateError(f'{what} {path} has no "chat_template" key; add it or pass a .jinja file')
    templates = _templates_from_value(data["chat_template"], str(path))
    try:
        specials = special_tokens_map(data, where=str(path))
    except ModelLoadError as exc:
        raise TemplateError(str(exc)) from None
    return templates, specials


class ChatTemplate:
    """A model's chat template(s) plus the special tokens templates can refer to.

    `ChatTemplate.load(...)` always returns an object; `available` is False when the
    model has no template, and `render` then raises TemplateError.
    """

    def __init__(
        self,
        templates: Mapping[str, str] | str | None,
        *,
        source: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        model_name: str = "model",
    ):
        if isinstance(templates, str):
            templates = {"default": templates}
        self.templates: dict[str, str] = dict(templates or {})
        self.source = source
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.model_name = model_name
        for name, text in self.templates.items():
            compile_template(text, origin=self._origin(name))

    def _origin(self, name: str) -> str:
        src = self.source or "<string>"
        return src if name == "default" or len(self.templates) == 1 else f"{src} [{name}]"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_string(
        cls, template: str, *, special_tokens: Mapping[str, str] | None = None, source: str = "<string>"
    ) -> ChatTemplate:
        return cls({"default": template}, source=source, special_tokens=special_tokens)

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None,
        *,
        chat_template_file: str | Path | None = None,
        jinja_explicit: str | Path | None = None,
        model_name: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> ChatTemplate:
        """Find the chat template. Priority: `jinja_explicit` (CLI -j, a .jinja file),
        `chat_template_file` (CLI -c: a .jinja file, or a JSON file with a
        "chat_template" key), then in `model_dir`: chat_template.jinja (plus named
        templates in additional_chat_templates/*.jinja), chat_template.json,
        tokenizer_config.json's "chat_template".

        Special tokens (bos_token, eos_token, ...) come from `model_dir`'s
        tokenizer_config.json, then a JSON -c file, then `special_tokens`.
        """
        directory = Path(model_dir) if model_dir is not None else None
        name = model_name or (directory.name if directory is not None else "model")
        specials: dict[str, str] = {}
        config: dict[str, Any] | None = None
        if directory is not None:
            config_path = directory / "tokenizer_config.json"
            if config_path.is_file():
                data = read_json_file(config_path, what="tokenizer config")
                if not isinstance(data, dict):
                    raise ModelLoadError(
                        f"tokenizer config file {config_path} must hold a JSON object; fix or re-download it"
                    )
                config = data
                specials.update(special_tokens_map(data, where=str(config_path)))

        templates: dict[str, str] = {}
        source: str | None = None
        if jinja_explicit is not None:
            path = Path(jinja_explicit)
            templates = {"default": _read_text(path, "chat template file (--jinja-explicit)")}
            source = str(path)
        elif chat_template_file is not None:
            path = Path(chat_template_file)
            if path.suffix.lower() == ".json":
                templates, file_specials = _read_json_templates(path, "chat template file (--chat-template)")
                specials.update(file_specials)
            else:
                templates = {"default": _read_text(path, "chat template file (--chat-template)")}
            source = str(path)
        elif directory is not None:
            jinja_path = directory / "chat_template.jinja"
            json_path = directory / "chat_template.json"
            extra_dir = directory / "additional_chat_templates"
            if jinja_path.is_file():
                templates = {"default": _read_text(jinja_path, "chat template file")}
                source = str(jinja_path)
                if extra_dir.is_dir():
                    for extra in sorted(extra_dir.glob("*.jinja")):
                        templates[extra.stem] = _read_text(extra, "chat template file")
            elif json_path.is_file():
                templates, _ = _read_json_templates(json_path, "chat template file")
                source = str(json_path)
            elif config is not None and config.get("chat_template") is not None:
                source = str(directory / "tokenizer_config.json")
                templates = _templates_from_value(config["chat_template"], source)

        if special_tokens:
            specials.update(special_tokens)
        return cls(templates, source=source, special_tokens=specials, model_name=name)

    # ----------------------------------------------------------------- querying
    @property
    def available(self) -> bool:
        return bool(self.templates)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.templates)

    @property
    def template(self) -> str | None:
        """The default template text (None if there is none)."""
        return self.templates.get("default") if "default" in self.templates else None

    def select(self, name: str | None = None, *, tools: Any = None) -> str:
        """The template text used for a render: `name` if given, else "tool_use" when
        tools are passed and the model has one, else "default" (like transformers)."""
        if not self.templates:
            raise TemplateError(
                f"model {self.model_name} has no chat template; use /v1/completions for plain text "
                "or pass --chat-template FILE"
            )
        if name is not None:
            if name not in self.templates:
                raise TemplateError(
                    f"model {self.model_name} has no chat template named {name!r} "
                    f"(available: {', '.join(sorted(self.templates))}); use one of those"
                )
            return self.templates[name]
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        if len(self.templates) == 1:
            return next(iter(self.templates.values()))
        raise TemplateError(
            f'model {self.model_name} has several chat templates and none is named "default" '
            f"(available: {', '.join(sorted(self.templates))}); pass --chat-template FILE"
        )

    def variables(self, name: str | None = None) -> frozenset[str]:
        """Variables the template reads from its context (e.g. "tools", "enable_thinking")."""
        import jinja2.meta

        text = self.select(name)
        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(text)))

    # ---------------------------------------------------------------- rendering
    def render(
        self,
        messages: Sequence[Any],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool | str = False,
        bos_token: str | None = None,
        eos_token: str | None = None,
        template_name: str | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to the prompt text.

        `extra` keyword arguments (enable_thinking, reasoning_effort, date_string, ...)
        are visible to the template, and override the special tokens. With
        `continue_final_message` the final (assistant) message is left open and no
        generation prompt is added.
        """
        text = self.select(template_name, tools=tools)
        name = template_name or next((k for k, v in self.templates.items() if v is text), "default")
        specials = dict(self.special_tokens)
        if bos_token is not None:
            specials["bos_token"] = bos_token
        if eos_token is not None:
            specials["eos_token"] = eos_token
        if continue_final_message:
            add_generation_prompt = False
        return render_template(
            text,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            special_tokens=specials,
            origin=self._origin(name),
            **extra,
        )

    __call__ = render

    def __repr__(self) -> str:
        return f"ChatTemplate(source={self.source!r}, names={list(self.templates)})"
