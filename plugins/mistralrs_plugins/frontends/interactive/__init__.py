"""Interactive mode: `mistralrs run -m MODEL` (a chat in the terminal) and `-i PROMPT` (one answer)."""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import CommandSpec, FrontendSpec


@hookimpl
def register_frontends(register):
    register(FrontendSpec(
        name="interactive",
        factory="mistralrs_plugins.frontends.interactive.chat:interactive_chat",
        description="chat in the terminal with streamed output",
    ))


@hookimpl
def register_commands(cli):
    cli.add_command(CommandSpec(
        name="run",
        help="Chat with a model in the terminal, or answer one prompt with -i",
        add_arguments="mistralrs_plugins.frontends.interactive.chat:add_arguments",
        run="mistralrs_plugins.frontends.interactive.chat:run",
    ))
