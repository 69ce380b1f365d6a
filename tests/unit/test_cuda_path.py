"""The CUDA path without a GPU: an explicit unavailable device is a clear error (API and CLI), the
CUDA device plugin's probe and info with ``torch.cuda`` mocked, KV-pool sizing from a GPU's free memory,
and what gets selected on ``cuda`` (paged attention; the Triton kernels when they can compile).
The end-to-end GPU run is tests/cuda/ (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.cli import main
from mistralrs.errors import ConfigError
from mistralrs.plugins import get_registry
from mistralrs.serving import ModelService, ServiceOptions, check_device, kv_cache_blocks, pick_device
from mistralrs_plugins.devices import cuda as cuda_plugin
from mistralrs_plugins.kernels import triton_support

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these tests are for machines without a GPU")
GiB = 1024**3
TRITON_OPS = ("rms_norm", "fused_add_rms_norm", "rotary", "silu_and_mul", "gelu_and_mul", "paged_attention_decode",
              "paged_attention_prefill", "kv_cache_write", "qmatmul_q4_0", "qmatmul_q8_0", "qmatmul_q2k",
              "qmatmul_q3k", "qmatmul_q4k")


def test_explicit_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--device cuda: cuda is not available on this machine \(.+\); use --cpu"):
        ModelService(ServiceOptions(model_id="demo", device="cuda"))


def test_unknown_device_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"no device plugin provides 'tpu' \(known: cpu, cuda, mps\)"):
        check_device(get_registry(), "tpu")


def test_cli_device_cuda_exits_2_before_loading(capsys):
    assert main(["run", "-m", "demo", "--device", "cuda", "-i", "hi"]) == 2
    assert "--device cuda: cuda is not available" in capsys.readouterr().err


def test_auto_device_is_the_cpu_here_and_cuda_with_a_gpu(monkeypatch):
    registry = get_registry()
    assert pick_device(registry) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(registry) == "cuda"
    assert pick_device(registry, device="cuda:0") == "cuda:0"
    assert pick_device(registry, cpu=True, device="cuda") == "cpu"


def test_cuda_plugin_reports_why_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in cuda_plugin.unavailable_reason()
    assert cuda_plugin._info() == {"devices": [], "unavailable": cuda_plugin.unavailable_reason()}
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert cuda_plugin.unavailable_reason().startswith("no GPU found")


def test_cuda_plugin_info_with_a_mocked_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (3 * GiB, 24 * GiB))
    assert cuda_plugin._available()
    info = cuda_plugin._info()
    assert [d["name"] for d in info["devices"]] == ["GPU0", "GPU1"]
    assert info["devices"][1] == {"index": 1, "name": "GPU1", "capability": "8.9", "memory_bytes": 24 * GiB,
                                  "free_bytes": 3 * GiB}


def test_kv_pool_from_the_gpus_free_memory(monkeypatch):
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return (10 * GiB, 24 * GiB)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    per_block = 2 * 1024 * 1024
    opts = ServiceOptions(model_id="demo")
    assert kv_cache_blocks(opts, bytes_per_block=per_block, device="cuda", max_model_len=4096) == \
        int(10 * GiB * 0.9) // per_block
    opts = ServiceOptions(model_id="demo", pa_memory_fraction=0.5)
    assert kv_cache_blocks(opts, bytes_per_block=per_block, device="cuda:1", max_model_len=4096) == 5 * GiB // per_block
    assert asked == [torch.device("cuda"), torch.device("cuda:1")]
    opts = ServiceOptions(model_id="demo", pa_memory_mb=300)
    assert kv_cache_blocks(opts, bytes_per_block=per_block, device="cuda", max_model_len=4096) == 150
    assert len(asked) == 2  # --pa-memory-mb does not ask the GPU


def test_kv_pool_counts_memory_torch_holds_unused(monkeypatch):
    # 1 GiB freed while loading stays in torch's caching allocator: the driver counts it used, the pool may take it.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * GiB)
    opts = ServiceOptions(model_id="demo", pa_memory_fraction=0.5)
    assert kv_cache_blocks(opts, bytes_per_block=GiB // 8, device="cuda", max_model_len=4096) == 20
    assert kv_cache_blocks(opts, bytes_per_block=GiB // 8, device="cuda", max_model_len=4096,
                           reserved_bytes=GiB) == 12  # a hybrid model's recurrent state comes out first


def test_paged_attention_is_the_default_on_cuda():
    backend = get_registry().attention_backends.select(device="cuda", dtype="bfloat16")
    assert backend.name == "paged"


def test_triton_kernels_do_not_claim_cuda_here_and_say_why():
    registry = get_registry()
    for op in TRITON_OPS:
        assert registry.kernel(op, "cuda").reference
        spec = next(k for k in registry.kernels if k.op == op and k.name == "triton")
        assert spec.devices == ("cuda",)
        assert spec.why_unsupported("cuda")
        assert spec.why_unsupported("cpu") == "Triton kernels run on cuda only, not cpu"


def test_triton_kernels_claim_cuda_where_they_compile(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_support, "triton_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    registry = get_registry()
    for op in TRITON_OPS:
        assert registry.kernel(op, "cuda").name == "triton"
        assert registry.kernel(op, "cpu").name != "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (6, 1))
    assert registry.kernel("rms_norm", "cuda").reference
    assert triton_support.why_not("cuda") == "compute capability 6.1 (Triton needs 7.0+)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter mode" in triton_support.why_not("cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("MISTRALRS_NO_TRITON_KERNELS", "1")
    assert triton_support.why_not("cuda") == "disabled by MISTRALRS_NO_TRITON_KERNELS"
    monkeypatch.delenv("MISTRALRS_NO_TRITON_KERNELS")
    monkeypatch.setattr(triton_support, "triton_installed", lambda: False)
    assert triton_support.why_not("cuda").startswith("triton is not installed")


def test_registering_the_triton_plugins_imports_neither_torch_nor_triton():
    import subprocess
    import sys

    code = ("import sys\n"
            "from mistralrs_plugins.kernels import triton_norm, triton_rotary, triton_activation, "
            "triton_attention, triton_quant, triton_affine, triton_widen, triton_moe\n"
            "specs = []\n"
            "for m in (triton_norm, triton_rotary, triton_activation, triton_attention, triton_quant, triton_affine,\n"
            "          triton_widen, triton_moe):\n"
            "    m.register_kernels(specs.append)\n"
            "assert len(specs) == 21, specs\n"
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugins_and_doctor_say_which_kernels_run_per_device_and_why_not(monkeypatch, capsys):
    from mistralrs.cli import plugins_cmd
    from mistralrs.nn.kernels import kernel_report, kernel_summary

    assert "kernels" not in plugins_cmd.collect()  # plain `plugins` probes no device (no torch import)
    data = plugins_cmd.collect(kernels=True)
    cuda = data["kernels"]["cuda"]
    assert cuda["rms_norm"] == {"active": "torch", "reference": True,
                                "inactive": {"triton": cuda["rms_norm"]["inactive"]["triton"]}}
    why = cuda["rms_norm"]["inactive"]["triton"]  # the first reason that applies on this machine
    assert why.startswith("no CUDA device") or why.startswith("triton is not installed"), why
    assert main(["plugins", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "triton not used for fused_add_rms_norm, gelu_and_mul, kv_cache_write, linear_fp8" in out
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = kernel_report(get_registry(), "cuda")
    if not why.startswith("triton is not installed"):  # with triton present, interpreter mode is the reason
        assert "interpreter mode" in report["rotary"]["inactive"]["triton"]
    assert kernel_summary(report)[0] == "active: none but the torch reference"
