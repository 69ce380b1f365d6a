"""One test per hook (named test_hook_<hook>), plus the meta-tests that keep it that way:
every hook has a test here and an entry in docs/hooks.md naming its arguments."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mistralrs import hookimpl, hookspecs
from mistralrs.plugins import PluginHost, reset_plugin_host
from mistralrs.specs import (
    ArchitectureSpec,
    CommandSpec,
    FrontendSpec,
    QuantizerSpec,
    ReasoningParserSpec,
    ToolCallParserSpec,
    ToolSourceSpec,
    resolve,
)
from tests.helpers.fake_plugins import plugin_module

ROOT = Path(__file__).resolve().parents[2]
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_"))


@pytest.fixture
def host():
    """The real installed plugins, in a host of our own (tests may add plugins to it)."""
    return PluginHost().load()


def add(host: PluginHost, name: str, **hooks) -> None:
    assert host.register(plugin_module(name, **hooks), name=name, distribution="test-plugins")


def test_hook_register_architectures(host):
    @hookimpl
    def register_architectures(register):
        register(ArchitectureSpec(name="tinyarch", builder="tests.unit.test_hooks:TinyModel",
                                  hf_architectures="TinyForCausalLM", model_types="tiny", gguf_architectures="tiny"))

    add(host, "arch", register_architectures=register_architectures)
    registry = host.registry()
    for query in ({"hf_architecture": "TinyForCausalLM"}, {"model_type": "tiny"}, {"gguf_architecture": "tiny"}):
        spec = registry.architecture_for(**query)
        assert spec.name == "tinyarch"
    assert resolve(spec.builder) is TinyModel


class TinyModel:
    pass


def test_hook_register_quantizers(host):
    @hookimpl
    def register_quantizers(register):
        register(QuantizerSpec(name="q4test", method="tests.unit.test_hooks:TinyModel", aliases=("Q4T",)))

    add(host, "quant", register_quantizers=register_quantizers)
    spec = host.registry().quantizers.get("q4test")
    assert spec.aliases == ("Q4T",) and resolve(spec.method) is TinyModel


def test_hook_register_attention_backends(host):
    from mistralrs.attention import AttentionBackend

    spec = host.registry().attention_backends.get("sdpa")
    assert issubclass(resolve(spec.backend), AttentionBackend)
    assert host.registry().attention_backends.select(device="cpu", dtype="float32") is not None


def test_hook_register_devices(host):
    devices = host.registry().devices
    cpu = devices.get("cpu")
    assert cpu.available() and cpu.device_type == "cpu"
    assert cpu.info()["threads"] >= 1
    assert devices.get("cuda").available() in (True, False)


def test_hook_register_kernels(host):
    import torch

    registry = host.registry()
    rms = resolve(registry.kernel("rms_norm", "cpu").impl)
    x, w = torch.randn(3, 8), torch.randn(8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms(x, w, 1e-6), expected)
    for op in ("rms_norm", "rotary", "silu_and_mul", "gelu_and_mul"):
        assert registry.reference_kernel(op).reference


class EchoTools:
    def list_tools(self):
        return [{"type": "function", "function": {"name": "echo", "description": "echo", "parameters": {}}}]

    def call(self, name, arguments):
        return f"echo:{arguments['text']}"


def test_hook_register_tool_sources(host):
    from mistralrs.tools import Toolbox

    @hookimpl
    def register_tool_sources(register):
        register(ToolSourceSpec(name="echo", factory=EchoTools))

    add(host, "tools", register_tool_sources=register_tool_sources)
    toolbox = Toolbox(host.registry(), sources=["echo"])
    assert [t["function"]["name"] for t in toolbox.list_tools()] == ["echo"]
    assert toolbox.call("echo", '{"text": "hi"}') == "echo:hi"


class ListSearch:
    def search(self, query, max_results=10):
        from mistralrs.web_search.results import SearchResult

        return [SearchResult(query, "d", "https://example.com/", "text")][:max_results]

    def extract(self, url):
        return "page"


def test_hook_register_search_backends(host):
    from mistralrs.specs import SearchBackendSpec
    from mistralrs.web_search.search import backend_from_registry

    @hookimpl
    def register_search_backends(register):
        register(SearchBackendSpec(name="list", factory=ListSearch, priority=100))

    add(host, "search", register_search_backends=register_search_backends)
    backend = backend_from_registry(host.registry())  # the highest priority
    assert isinstance(backend, ListSearch) and backend.search("q")[0].title == "q"
    assert isinstance(backend_from_registry(host.registry(), "list"), ListSearch)


def test_hook_register_frontends(host):
    @hookimpl
    def register_frontends(register):
        register(FrontendSpec(name="null", factory="tests.unit.test_hooks:TinyModel", description="does nothing"))

    add(host, "frontend", register_frontends=register_frontends)
    assert resolve(host.registry().frontends.get("null").factory) is TinyModel


def _hello_arguments(parser):
    parser.add_argument("--name", default="world")


def _hello_run(args):
    print(f"hello {args.name}")
    return 3


def test_hook_register_commands(host, capsys):
    from mistralrs.cli import main

    @hookimpl
    def register_commands(cli):
        cli.add_command(CommandSpec(name="hello", help="say hello", add_arguments=_hello_arguments, run=_hello_run))

    add(host, "cmd", register_commands=register_commands)
    reset_plugin_host(host)
    try:
        assert main(["hello", "--name", "plugin"]) == 3
    finally:
        reset_plugin_host(None)
    assert capsys.readouterr().out == "hello plugin\n"


def test_hook_register_tool_parsers(host):
    @hookimpl
    def register_tool_parsers(register):
        register(ToolCallParserSpec(name="hermes_test", parser="tests.unit.test_hooks:TinyModel", model_types=("qwen2",)))

    add(host, "tp", register_tool_parsers=register_tool_parsers)
    assert host.registry().tool_parsers.get("hermes_test").model_types == ("qwen2",)


def test_hook_register_reasoning_parsers(host):
    @hookimpl
    def register_reasoning_parsers(register):
        register(ReasoningParserSpec(name="think_test", parser="tests.unit.test_hooks:TinyModel"))

    add(host, "rp", register_reasoning_parsers=register_reasoning_parsers)
    assert "think_test" in host.registry().reasoning_parsers


# -- meta-tests --------------------------------------------------------------------------

def test_every_hook_is_a_catalogue_hook():
    assert sorted(hookspecs.CATALOGUE_HOOKS) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert re.search(rf"def test_hook_{hook}\b", sources), f"write test_hook_{hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_arguments(hook):
    docs = (ROOT / "docs" / "hooks.md").read_text()
    section = re.search(rf"^### `{hook}\((.*?)\)`$(.*?)(?=^### |\Z)", docs, re.M | re.S)
    assert section, f"docs/hooks.md has no '### `{hook}(...)`' section"
    documented_args = [a.strip() for a in section.group(1).split(",") if a.strip()]
    assert documented_args == list(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert len(section.group(2).strip()) > 80, f"document what {hook} receives and must register"
