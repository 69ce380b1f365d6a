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
    cli.add_command(CommandSpec(
        name="doctor",
        help="Run system diagnostics and environment checks",
        add_arguments="mistralrs.cli.doctor_cmd:add_arguments",
        run="mistralrs.cli.doctor_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="login",
        help="Save a Hugging Face token for gated and private models",
        add_arguments="mistralrs.cli.login_cmd:add_arguments",
        run="mistralrs.cli.login_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="cache",
        help="List or delete models in the Hugging Face cache",
        add_arguments="mistralrs.cli.cache_cmd:add_arguments",
        run="mistralrs.cli.cache_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="bench",
        help="Benchmark prefill and decode speed of a model",
        add_arguments="mistralrs.cli.bench_cmd:add_arguments",
        run="mistralrs.cli.bench_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="tune",
        help="Recommend a quantization for a model on this machine (from config.json alone)",
        add_arguments="mistralrs.cli.tune_cmd:add_arguments",
        run="mistralrs.cli.tune_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="completions",
        help="Print a shell completion script (bash, zsh, fish, elvish, powershell)",
        add_arguments="mistralrs.cli.completions_cmd:add_arguments",
        run="mistralrs.cli.completions_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="from-config",
        help="Run or serve models from a TOML configuration file (several models at once)",
        add_arguments="mistralrs.cli.from_config_cmd:add_arguments",
        run="mistralrs.cli.from_config_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="quantize",
        help="Write UQFF quantized model files (one type or several)",
        add_arguments="mistralrs.cli.quantize_cmd:add_arguments",
        run="mistralrs.cli.quantize_cmd:run",
    ))
    cli.add_command(CommandSpec(
        name="uqff",
        help="Report, verify or inspect UQFF files without loading a model",
        add_arguments="mistralrs.cli.uqff_cmd:add_arguments",
        run="mistralrs.cli.uqff_cmd:run",
    ))
