"""mistralrs-example-plugin: registers the `parallel_llama` architecture and the `units` tool
source through mistralrs's public hooks.

This module is imported by every `mistralrs` command, so it only registers: the torch model
and the tools are named by lazy "module:attribute" strings and imported on first use.
"""

from __future__ import annotations

from mistralrs import hookimpl
from mistralrs.specs import ArchitectureSpec, ToolSourceSpec


@hookimpl
def register_architectures(register):
    register(ArchitectureSpec(
        name="parallel_llama",
        builder="mistralrs_example_plugin.model:ParallelLlamaForCausalLM",
        # How a checkpoint is matched: config.json "architectures"[0], then "model_type".
        hf_architectures=("ParallelLlamaForCausalLM",),
        model_types=("parallel_llama",),
        description="Llama with parallel attention + MLP blocks (GPT-J/PaLM style; mistralrs-example-plugin)",
    ))


@hookimpl
def register_tool_sources(register):
    register(ToolSourceSpec(
        name="units",
        factory="mistralrs_example_plugin.tools:UnitTools",
        description="length unit conversion (mistralrs-example-plugin)",
    ))
