"""The CLI's own commands, registered through the same hook third parties use."""

from __future__ import annotations

from mistralrs.hookspecs import hookimpl
from mistralrs.specs import CommandSpec


@hookimpl
def register_commands(cli):
    cli.add_command(CommandSpec(
        name="plugins",
        help="List installed plugins, their hooks and what they registered",
        add_arguments="mistralrs.cli.plugins_cmd:add_arguments",
        run="mistralrs.cli.plugins_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="tools",
        help="List and call the tools that tool-source plugins provide",
        add_arguments="mistralrs.cli.tools_cmd:add_arguments",
        run="mistralrs.cli.tools_cmd:run",
    ))
