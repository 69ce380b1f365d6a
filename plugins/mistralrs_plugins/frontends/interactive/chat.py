"""The interactive chat behind `mistralrs run`."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, TextIO

from mistralrs.cli.model_options import add_model_arguments

HELP = """Commands:
  \\help              show this help
  \\exit              quit
  \\system <message>  set the system prompt (clears the chat)
  \\clear             forget the conversation
  \\temperature <f>   set the sampling temperature
  \\topk <n>          set top-k
  \\topp <f>          set top-p
(`/` works in place of `\\`.) Ctrl-C stops the current answer; Ctrl-D or \\exit quits."""

# mistral.rs's interactive defaults when the model has no generation_config.json.
FALLBACK_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, max_seqs_default=32)
    parser.add_argument("-i", "--input", help="answer this prompt once and exit")
    parser.add_argument("--thinking", choices=["true", "false"], help="enable or disable thinking (templates that support it)")
    parser.add_argument("--enable-thinking", action="store_true", help="same as --thinking true")
    parser.add_argument("--reasoning-effort", choices=["off", "none", "low", "medium", "high", "xhigh"])
    parser.add_argument("--max-tokens", type=int, help="cap the answer length")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    from mistralrs_plugins.frontends.openai_server.cli import add_tool_arguments

    add_tool_arguments(parser)


DIM = "\x1b[2m"
RESET = "\x1b[0m"


# An image path or URL in a prompt (mistral.rs's interactive mode: png, jpeg, bmp, gif, webp).
IMAGE_REF = re.compile(r"(?:(?:https?|file)://\S+|(?:~|\.{0,2}/)?[\w./~-]*\w)\.(?:png|jpe?g|bmp|gif|webp)\b",
                       re.IGNORECASE)


class InteractiveChat:
    """The chat loop. Reasoning (`<think>...</think>`, split by the model's reasoning parser)
    is shown dimmed when `out` is a terminal (`color=None`) or `color=True`, and is not kept
    in the history; tool calls are shown as `[tool call] name {arguments}`, server-side tool
    rounds (tool-source plugins enabled with --enable-tool-sources) as `[name(...) -> result]`."""

    def __init__(self, service: Any, *, out: TextIO | None = None, sampling: dict | None = None,
                 template_kwargs: dict | None = None, max_tokens: int | None = None, tools: Any = None,
                 color: bool | None = None) -> None:
        self.service = service
        self.out = out if out is not None else sys.stdout  # looked up now: stdout may be replaced
        self.system: str | None = None
        self.history: list[dict[str, str]] = []
        self.sampling = dict(sampling or {})
        self.template_kwargs = template_kwargs or {}
        self.max_tokens = max_tokens
        self.tools = tools
        if color is None:
            isatty = getattr(out, "isatty", None)
            color = bool(isatty()) if callable(isatty) else False
        self.color = color

    def _body(self, messages: list[dict[str, str]] | None, prompt: str | None) -> dict:
        body: dict[str, Any] = {**self.sampling, **self.template_kwargs}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        if messages is not None:
            body["messages"] = messages
            if getattr(self.tools, "search", None) is not None:  # run --enable-search: every turn may search
                body["web_search_options"] = {}
        else:
            body["prompt"] = prompt
        return body

    def _dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.color and text else text

    def _show(self, parsed: tuple[str, str, list[Any]], parts: list[str]) -> None:
        reasoning, content, calls = parsed
        if reasoning:
            self.out.write(self._dim(reasoning))
        if content:
            if self._in_reasoning:
                self.out.write("\n")
            parts.append(content)
            self.out.write(content)
        self._in_reasoning = bool(reasoning) or (self._in_reasoning and not content)
        for call in calls:
            self.out.write(f"\n[tool call] {call.name} {call.arguments}\n")
        self.out.flush()

    def _content(self, text: str) -> Any:
        """A vision model's turn: image paths and URLs in the line become image parts (as
        mistral.rs's interactive mode detects them); the rest is the text."""
        if getattr(self.service, "processor", None) is None:
            return text
        found = IMAGE_REF.findall(text)
        if not found:
            return text
        rest = IMAGE_REF.sub(" ", text).strip()
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": ref}} for ref in found]
        return parts + ([{"type": "text", "text": rest}] if rest else [])

    def answer(self, text: str) -> str:
        """Stream one answer to `out`; Ctrl-C cancels it. Returns the answer (without reasoning)."""
        from mistralrs import protocol as P
        from mistralrs.engine.engine import RequestFailed, TokenDelta
        from mistralrs.tool_calling import ToolLoop, prepare_chat

        has_template = self.service.chat_template.available
        plan = pipe = None
        if has_template:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            content = self._content(text)
            messages.append({"role": "user", "content": content})
            plan = prepare_chat(self.service, self._body(messages, None), self.tools)
            handle: Any = ToolLoop(plan, self.service.engine.submit)
            pipe = plan.new_pipeline() if plan.active else None
        else:
            gen = P.build_completion_request(self.service, self._body(None, text))
            handle = self.service.engine.submit(gen)
        parts: list[str] = []
        self._in_reasoning = False
        try:
            for event in handle:
                name = type(event).__name__
                if isinstance(event, TokenDelta) and event.text:
                    self._show(pipe.feed(event.text) if pipe is not None else ("", event.text, []), parts)
                elif name == "RoundBoundary" and plan is not None:
                    if pipe is not None:
                        self._show(pipe.finish(), parts)
                        pipe = plan.new_pipeline()
                    rec = event.record
                    self.out.write(self._dim(f"\n[{rec.name}({rec.arguments}) -> {rec.result_content}]") + "\n")
                elif name == "ChoiceFinished" and pipe is not None:
                    self._show(pipe.finish(), parts)
                elif isinstance(event, RequestFailed):
                    raise event.error
        except KeyboardInterrupt:
            handle.cancel()
            self.out.write("\n[stopped]")
        self.out.write("\n")
        self.out.flush()
        answer = "".join(parts)
        if has_template:
            self.history += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        return answer

    def command(self, line: str) -> bool:
        """Handle a \\command; returns False to exit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        try:
            if name in ("exit", "quit"):
                return False
            if name == "help":
                self.out.write(HELP + "\n")
            elif name == "clear":
                self.history.clear()
                self.out.write("[conversation cleared]\n")
            elif name == "system":
                self.system = arg or None
                self.history.clear()
                self.out.write("[system prompt set]\n" if arg else "[system prompt removed]\n")
            elif name == "temperature":
                self.sampling["temperature"] = float(arg)
                self.out.write(f"[temperature {float(arg)}]\n")
            elif name == "topk":
                self.sampling["top_k"] = int(arg)
                self.out.write(f"[top-k {int(arg)}]\n")
            elif name == "topp":
                self.sampling["top_p"] = float(arg)
                self.out.write(f"[top-p {float(arg)}]\n")
            else:
                self.out.write(f"unknown command \\{name}; type \\help\n")
        except ValueError:
            self.out.write(f"\\{name} needs a number, e.g. \\{name} 0.7\n")
        return True

    def run(self, prompt: str | None = None) -> int:
        """Answer `prompt` once, or chat until EOF/\\exit; the service is shut down after."""
        try:
            if prompt is not None:
                self.answer(prompt)
            else:
                self.loop()
        finally:
            self.service.shutdown()
        return 0

    def loop(self, inp: TextIO | None = None) -> None:
        inp = inp if inp is not None else sys.stdin
        self.out.write("Chat started. Type \\help for commands, \\exit to quit.\n")
        while True:
            try:
                self.out.write("> ")
                self.out.flush()
                line = inp.readline()
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            if not line:
                self.out.write("\n")
                return
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line[0] in "\\/" and line[1:2].isalpha():
                if not self.command(line):
                    return
                continue
            try:
                self.answer(line)
            except KeyboardInterrupt:  # arrived before the answer started streaming
                self.out.write("\n[stopped]\n")


def run(args: argparse.Namespace) -> int:
    from mistralrs.cli.model_options import options_from_args
    from mistralrs.services import open_service
    from mistralrs_plugins.frontends.openai_server.cli import load_search_reranker, tool_config_from_args

    opts = options_from_args(args)
    tools = tool_config_from_args(args)
    thinking = None
    if args.thinking is not None or args.enable_thinking:
        thinking = args.enable_thinking or args.thinking == "true"
    try:
        service = open_service(opts)
        load_search_reranker(args, tools)
        return chat_with(service, tools=tools, prompt=args.input, temperature=args.temperature,
                         enable_thinking=thinking, reasoning_effort=args.reasoning_effort, max_tokens=args.max_tokens)
    finally:
        tools.close()  # MCP sessions and their child processes, the search reranker


def interactive_chat(service: Any, *, tools: Any = None, temperature: float | None = None,
                     enable_thinking: bool | None = None, reasoning_effort: str | None = None,
                     max_tokens: int | None = None) -> InteractiveChat:
    """The `interactive` frontend's factory: a terminal chat over a loaded service; `.run()`
    chats (or answers one prompt) and shuts the service down after."""
    if getattr(service, "kind", "text") == "embedding":
        service.shutdown()
        from mistralrs.errors import ConfigError

        raise ConfigError(f"{service.model_id} is an embedding model: it has no chat; serve it with "
                          f"`mistralrs serve -m {service.model_id}` and POST /v1/embeddings, or use "
                          "Runner.send_embedding_request")
    if service.loaded.dummy_weights:
        print(f"note: {service.model_id} has random weights: its answers are random text", file=sys.stderr)
    sampling: dict[str, Any] = {}
    defaults = service.generation_defaults
    if all(getattr(defaults, k, None) is None for k in ("temperature", "top_k", "top_p", "do_sample")):
        sampling.update(FALLBACK_SAMPLING)
    if temperature is not None:
        sampling["temperature"] = temperature
    kwargs: dict[str, Any] = {}
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    if reasoning_effort:
        kwargs["reasoning_effort"] = reasoning_effort
    return InteractiveChat(service, sampling=sampling, template_kwargs=kwargs, max_tokens=max_tokens, tools=tools)


def chat_with(service: Any, *, prompt: str | None = None, **options: Any) -> int:
    """Chat with a loaded service in the terminal (or answer `prompt` once); shuts it down after."""
    return interactive_chat(service, **options).run(prompt)
