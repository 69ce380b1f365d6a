"""Plugin discovery, switches, failures, conflicts and selection, with faked distributions."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from mistralrs import hookimpl
from mistralrs.errors import NoCandidateError, NotFoundError, PluginConflictError
from mistralrs.plugins import PluginLoadWarning
from mistralrs.specs import ArchitectureSpec, AttentionBackendSpec, DeviceSpec, KernelSpec
from tests.helpers.fake_plugins import dist, host_with, plugin_module


def arch_plugin(name: str, *, hf: str | None = None, priority: int = 0, overrides: bool = False):
    @hookimpl
    def register_architectures(register):
        register(ArchitectureSpec(
            name=name, builder="x:Y", hf_architectures=(hf or f"{name.title()}ForCausalLM",),
            model_types=(name,), priority=priority, overrides=overrides,
        ))

    return plugin_module(f"plug_{name}", register_architectures=register_architectures)


def first_party():
    return dist("mistralrs", "0.1.0", llama=arch_plugin("llama"))


def test_discovers_entry_points_with_distribution_and_version():
    host = host_with(first_party(), dist("acme-models", "2.3", acme=arch_plugin("acme")))
    registry = host.registry()
    assert registry.architectures.names() == ["acme", "llama"]
    info = host.plugins["acme"]
    assert (info.distribution, info.version, info.first_party) == ("acme-models", "2.3", False)
    assert host.plugins["llama"].first_party
    assert host.hooks_of("acme") == ["register_architectures"]
    assert registry.registered_by["acme"] == {"architecture": ["acme"]}
    assert registry.architectures.entry("acme").distribution == "acme-models"


def test_entry_points_load_once():
    calls = []

    def distributions():
        calls.append(1)
        return [first_party()]

    from mistralrs.plugins import PluginHost

    host = PluginHost(distributions=distributions, environ={}, internal=())
    host.load()
    host.load()
    host.registry()
    assert calls == [1]


def test_other_groups_are_ignored():
    d = dist("acme", acme=arch_plugin("acme"))
    d.entry_points[0].group = "pytest11"
    host = host_with(first_party(), d)
    assert "acme" not in host.registry().architectures


@pytest.mark.parametrize("allow", ["acme", "acme-models", "ACME_models"])
def test_allow_list_by_entry_point_or_distribution(allow):
    host = host_with(
        first_party(),
        dist("acme-models", acme=arch_plugin("acme")),
        dist("other", other=arch_plugin("other")),
        environ={"MISTRALRS_PLUGINS": allow},
    )
    assert host.registry().architectures.names() == ["acme", "llama"]  # first-party always loads


def test_disable_autoload_keeps_first_party_and_explicit_plugins():
    dists = (first_party(), dist("acme", acme=arch_plugin("acme")), dist("other", other=arch_plugin("other")))
    host = host_with(*dists, environ={"MISTRALRS_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert host.registry().architectures.names() == ["llama"]
    host = host_with(*dists, environ={"MISTRALRS_DISABLE_PLUGIN_AUTOLOAD": "1", "MISTRALRS_PLUGINS": "other"})
    assert host.registry().architectures.names() == ["llama", "other"]


def test_block_list_applies_to_first_party_too():
    host = host_with(first_party(), dist("acme", acme=arch_plugin("acme")), environ={"MISTRALRS_BLOCK_PLUGINS": "llama"})
    assert host.registry().architectures.names() == ["acme"]


def test_plugin_that_fails_to_import_is_a_warning_naming_it():
    host = host_with(first_party(), dist("broken-dist", "0.9", broken=ImportError("No module named 'nonexistent'")))
    with pytest.warns(PluginLoadWarning) as record:
        registry = host.registry()
    message = str(record[0].message)
    assert "'broken'" in message and "broken-dist 0.9" in message and "No module named 'nonexistent'" in message
    assert registry.architectures.names() == ["llama"]
    assert [(f.name, f.stage) for f in host.failures] == [("broken", "import")]


def test_plugin_that_raises_while_registering_loses_only_its_own_entries():
    @hookimpl
    def register_architectures(register):
        register(ArchitectureSpec(name="half", builder="x:Y"))
        raise RuntimeError("boom")

    host = host_with(first_party(), dist("flaky", flaky=plugin_module("flaky", register_architectures=register_architectures)))
    with pytest.warns(PluginLoadWarning, match=r"'flaky' \(flaky 1.0\) failed to register.*RuntimeError: boom"):
        registry = host.registry()
    assert registry.architectures.names() == ["llama"]


def test_registering_the_wrong_spec_type_is_a_warning():
    @hookimpl
    def register_architectures(register):
        register(DeviceSpec(name="cpu2", device_type="cpu", available=lambda: True))

    host = host_with(first_party(), dist("wrong", wrong=plugin_module("wrong", register_architectures=register_architectures)))
    with pytest.warns(PluginLoadWarning, match="expects ArchitectureSpec objects, got DeviceSpec"):
        host.registry()


def test_unknown_hook_and_bad_signature_are_warnings():
    @hookimpl
    def register_architecturez(register):
        pass

    @hookimpl
    def register_devices(register, unexpected_argument):
        pass

    host = host_with(first_party(), dist(
        "typos",
        typo=plugin_module("typo", register_architecturez=register_architecturez),
        badsig=plugin_module("badsig", register_devices=register_devices),
    ))
    with pytest.warns(PluginLoadWarning) as record:
        host.load()
    messages = " ".join(str(r.message) for r in record)
    assert "unknown hook(s) register_architecturez" in messages
    assert "'badsig'" in messages and "unexpected_argument" in messages
    assert set(host.plugins) == {"llama"}


def test_duplicate_names_are_an_error_naming_both_distributions():
    host = host_with(first_party(), dist("acme-models", "2.0", acme=arch_plugin("llama")))
    with pytest.raises(PluginConflictError) as exc:
        host.registry()
    assert "mistralrs" in str(exc.value) and "acme-models" in str(exc.value)
    assert "overrides=True" in str(exc.value)


def test_declared_override_wins_regardless_of_load_order():
    for order in (0, 1):
        dists = [first_party(), dist("acme", acme=arch_plugin("llama", hf="AcmeLlama", overrides=True))]
        host = host_with(*(dists if order == 0 else dists[::-1]))
        registry = host.registry()
        assert registry.architectures.entry("llama").distribution == "acme"
        assert registry.architectures.get("llama").hf_architectures == ("AcmeLlama",)


def test_duplicate_entry_point_name_in_second_distribution_is_skipped_with_warning():
    host = host_with(first_party(), dist("copycat", llama=arch_plugin("copy")))
    with pytest.warns(PluginLoadWarning, match="entry-point name 'llama' is already used by mistralrs"):
        registry = host.registry()
    assert registry.architectures.names() == ["llama"]


def backends_plugin(*specs):
    @hookimpl
    def register_attention_backends(register):
        for spec in specs:
            register(spec)

    return plugin_module("backends", register_attention_backends=register_attention_backends)


def test_selection_by_supports_and_priority():
    specs = [
        AttentionBackendSpec(name="reference", backend="x:Y", priority=0),
        AttentionBackendSpec(name="fast_cpu", backend="x:Y", priority=10,
                             supports=lambda device, dtype: device == "cpu" and dtype != "float16"),
        AttentionBackendSpec(name="gpu", backend="x:Y", priority=100, supports=lambda device: device == "cuda"),
    ]
    registry = host_with(first_party(), dist("b", b=backends_plugin(*specs))).registry()
    cat = registry.attention_backends
    assert cat.select(device="cpu", dtype="bfloat16").name == "fast_cpu"
    assert cat.select(device="cpu", dtype="float16").name == "reference"
    assert cat.select(device="cuda", dtype="float16").name == "gpu"
    assert [s.name for s in cat.candidates(device="cuda", dtype="bfloat16")] == ["gpu", "reference"]


def test_selection_without_candidates_names_context_and_registered():
    registry = host_with(first_party(), dist("b", b=backends_plugin(
        AttentionBackendSpec(name="gpu", backend="x:Y", supports=lambda device: device == "cuda")))).registry()
    with pytest.raises(NoCandidateError, match="no attention_backend supports device=cpu; registered: gpu"):
        registry.attention_backends.select(device="cpu")


def test_lookup_by_name_lists_registered_names():
    registry = host_with(first_party()).registry()
    with pytest.raises(NotFoundError, match="unknown architecture 'nope'; registered: llama"):
        registry.architectures.get("nope")


def test_architecture_lookup_order_and_unknown_lists_supported():
    registry = host_with(first_party(), dist("a", a=arch_plugin("qwen2"))).registry()
    assert registry.architecture_for(hf_architecture="Qwen2ForCausalLM").name == "qwen2"
    assert registry.architecture_for(hf_architecture="Unknown", model_type="llama").name == "llama"
    with pytest.raises(NotFoundError) as exc:
        registry.architecture_for(hf_architecture="FooForCausalLM", model_type="foo")
    assert "'FooForCausalLM'" in str(exc.value) and "LlamaForCausalLM" in str(exc.value) and "--arch" in str(exc.value)


def test_kernel_selection_per_op_and_device():
    @hookimpl
    def register_kernels(register):
        register(KernelSpec(name="torch", op="rms_norm", impl="x:y", devices=("cpu", "cuda"), reference=True))
        register(KernelSpec(name="torch", op="rotary", impl="x:z", devices=("cpu", "cuda"), reference=True))
        register(KernelSpec(name="triton", op="rms_norm", impl="t:y", devices=("cuda",), priority=10))

    registry = host_with(first_party(), dist("k", k=plugin_module("k", register_kernels=register_kernels))).registry()
    assert registry.kernel("rms_norm", "cpu").name == "torch"
    assert registry.kernel("rms_norm", "cuda").name == "triton"
    assert registry.reference_kernel("rms_norm").impl == "x:y"
    assert registry.kernels.names() == ["rms_norm/torch", "rms_norm/triton", "rotary/torch"]


def test_tracing_writes_hook_calls_to_stderr(capsys):
    host = host_with(first_party(), environ={"MISTRALRS_TRACE_PLUGINS": "1"})
    host.registry()
    err = capsys.readouterr().err
    assert "loaded plugin llama (mistralrs)" in err
    assert "register_architectures -> llama: llama" in err


def test_missing_first_party_distribution_warns_with_fix():
    with pytest.warns(PluginLoadWarning, match=r"pip install -e \."):
        host_with(dist("acme", acme=arch_plugin("acme"))).load()


def test_manual_register_and_unregister_invalidate_registry():
    host = host_with(first_party())
    assert host.registry().architectures.names() == ["llama"]
    host.register(arch_plugin("extra"), name="extra")
    assert host.registry().architectures.names() == ["extra", "llama"]
    host.unregister("extra")
    assert host.registry().architectures.names() == ["llama"]


# -- against the real installation ------------------------------------------------------

def _run(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_help_and_plugins_do_not_import_torch():
    code = (
        "import sys\n"
        "from mistralrs.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "main(['plugins'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'mcp' not in sys.modules, 'the mcp SDK was imported (the MCP plugins register lazily)'\n"
        "print('NO_TORCH')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "NO_TORCH" in result.stdout


def test_plugins_json_lists_first_party_plugins_from_entry_points():
    result = subprocess.run(
        [sys.executable, "-m", "mistralrs", "plugins", "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["attention_sdpa"]["distribution"] == "mistralrs"
    assert by_name["attention_sdpa"]["registered"] == {"attention_backend": ["sdpa"]}
    assert by_name["device_cpu"]["hooks"] == ["register_devices"]
    assert "rms_norm/torch" in by_name["kernels_torch"]["registered"]["kernel"]
    assert data["failed"] == []


def test_real_registry_has_builtin_kinds():
    from mistralrs.plugins import PluginHost

    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        registry = PluginHost().registry()
    assert {"cpu", "cuda", "mps"} <= set(registry.devices.names())
    assert registry.devices.get("cpu").available()
    assert registry.attention_backends.select(device="cpu", dtype="float32").name in registry.attention_backends
    assert {"plugins", "tools"} <= set(registry.commands.names())
