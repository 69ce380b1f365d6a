"""`mistralrs doctor [--json]`: system diagnostics and environment checks.

Reports the CPU's vector extensions, torch and its devices (CUDA compute capability, MPS),
triton, which kernel and attention backend mistralrs would select on the CPU with the auto
dtype, the Hugging Face cache (writable? free disk?), whether a token is found (never printed),
Hub connectivity (skipped when HF_HUB_OFFLINE is set) and plugins that failed to load.

Every check has a status: ok, info, warn or error. **Exit status: 1 when any check is an
error, else 0.** Errors are what stops every model from running: torch cannot be imported, no
device, no attention backend or no kernel for a required op on the CPU, no architecture
registered. Everything else (no network, no token, unwritable cache, low disk, a third-party
plugin that failed to load, no triton) is a warning: local models still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# Free space under which the cache's disk gets a warning.
LOW_DISK_BYTES = 10 * 10**9
HUB_TIMEOUT_S = 5.0

# (flag in /proc/cpuinfo, name in the report) for x86-64.
X86_FLAGS: tuple[tuple[str, str], ...] = (
    ("sse4_2", "sse4.2"),
    ("avx", "avx"),
    ("avx2", "avx2"),
    ("fma", "fma"),
    ("f16c", "f16c"),
    ("avx_vnni", "avx_vnni"),
    ("avx512f", "avx512f"),
    ("avx512bw", "avx512bw"),
    ("avx512vl", "avx512vl"),
    ("avx512_vnni", "avx512_vnni"),
    ("avx512_bf16", "avx512_bf16"),
    ("avx512_fp16", "avx512_fp16"),
    ("amx_tile", "amx_tile"),
    ("amx_bf16", "amx_bf16"),
    ("amx_int8", "amx_int8"),
)
# (feature in /proc/cpuinfo "Features", name in the report) for ARM.
ARM_FLAGS: tuple[tuple[str, str], ...] = (
    ("asimd", "neon"),
    ("asimdhp", "fp16"),
    ("asimddp", "dotprod"),
    ("i8mm", "i8mm"),
    ("bf16", "bf16"),
    ("sve", "sve"),
    ("sve2", "sve2"),
    ("sme", "sme"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the checklist")


# ----------------------------------------------------------------------------- probes


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo; (None, empty) when unreadable."""
    brand: str | None = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and brand is None:
                    brand = value.strip() or None
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return brand, flags


def _sysctl(*names: str) -> str:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def cpu_report() -> dict[str, Any]:
    machine = platform.machine().lower()
    arch = "arm" if machine in ("arm64", "aarch64") or machine.startswith("arm") else (
        "x86" if machine in ("x86_64", "amd64", "i386", "i686", "x86") else machine)
    brand, flags = _cpuinfo()
    if sys.platform == "darwin":
        brand = brand or _sysctl("machdep.cpu.brand_string").strip() or None
        if arch == "x86":
            flags |= {f.lower().replace(".", "_") for f in _sysctl("machdep.cpu.features",
                                                                    "machdep.cpu.leaf7_features").split()}
            if "avx512bf16" in flags:
                flags.add("avx512_bf16")
            if "avx2_0" in flags:
                flags.add("avx2")
    table = X86_FLAGS if arch == "x86" else ARM_FLAGS if arch == "arm" else ()
    extensions = {name: flag in flags for flag, name in table}
    if arch == "arm" and machine in ("arm64", "aarch64"):
        extensions["neon"] = True  # Advanced SIMD is mandatory on AArch64
    return {
        "arch": arch,
        "machine": platform.machine(),
        "brand": brand or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "extensions": extensions,
        "flags_source": "/proc/cpuinfo" if flags and sys.platform != "darwin" else (
            "sysctl" if sys.platform == "darwin" else None),
    }


def memory_report() -> dict[str, int | None]:
    total = avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if key == "MemTotal" and parts:
                    total = int(parts[0]) * 1024
                elif key == "MemAvailable" and parts:
                    avail = int(parts[0]) * 1024
    except (OSError, ValueError):
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            avail = avail or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return {"total_bytes": total, "available_bytes": avail}


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def cache_writable(path: Path) -> tuple[bool, str]:
    """Whether files can be created in `path` (or, when it does not exist yet, where it would be
    created). Probes with a temporary file that is removed at once."""
    target = path if path.is_dir() else _existing_ancestor(path)
    if not target.is_dir():
        return False, f"{target} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".mistralrs-doctor-"):
            pass
    except OSError as exc:
        return False, exc.strerror or str(exc)
    return True, "" if target == path else f"does not exist yet; will be created under {target}"


def token_report() -> dict[str, Any]:
    """Where a token would come from with the default `--token-source cache` (never the token)."""
    from mistralrs.hub import hf_home

    for var in ("HF_TOKEN", "HF_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return {"found": True, "source": f"env:{var}"}
    path = hf_home() / "token"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return {"found": False, "source": None, "path": str(path)}
    except OSError as exc:
        return {"found": False, "source": None, "path": str(path), "error": exc.strerror or str(exc)}
    return {"found": bool(text), "source": f"file:{path}" if text else None, "path": str(path)}


def connectivity_report(token_found: bool) -> dict[str, Any]:
    """HEAD the Hub (short timeout); with a token, ask whoami whether it is accepted."""
    import urllib.error
    import urllib.request

    from mistralrs.hub import is_offline, resolve_token

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if is_offline():
        return {"checked": False, "endpoint": endpoint, "reason": "HF_HUB_OFFLINE is set"}
    out: dict[str, Any] = {"checked": True, "endpoint": endpoint}
    try:
        req = urllib.request.Request(endpoint, method="HEAD", headers={"User-Agent": "mistralrs-doctor"})
        with urllib.request.urlopen(req, timeout=HUB_TIMEOUT_S) as resp:
            out.update(reachable=True, status=resp.status)
    except urllib.error.HTTPError as exc:  # an HTTP answer still means the Hub is reachable
        out.update(reachable=True, status=exc.code)
    except Exception as exc:  # noqa: BLE001 - any failure is a warning, never a crash
        out.update(reachable=False, error=f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
        return out
    if token_found:
        try:
            token = resolve_token("cache")
        except Exception:  # noqa: BLE001
            token = None
        if token:
            req = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers={
                "Authorization": f"Bearer {token}", "User-Agent": "mistralrs-doctor"})
            try:
                with urllib.request.urlopen(req, timeout=HUB_TIMEOUT_S):
                    out["token_valid"] = True
            except urllib.error.HTTPError as exc:
                out["token_valid"] = False if exc.code in (401, 403) else None
                out["token_status"] = exc.code
            except Exception:  # noqa: BLE001
                out["token_valid"] = None
    return out


def _devices(registry: Any) -> list[dict[str, Any]]:
    devices = []
    for spec in sorted(registry.devices, key=lambda s: -s.priority):
        entry: dict[str, Any] = {"name": spec.name, "type": spec.device_type, "priority": spec.priority}
        try:
            entry["available"] = bool(spec.available())
        except Exception as exc:  # noqa: BLE001 - a broken probe is reported, not raised
            entry["available"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
        if entry["available"] and spec.info is not None:
            try:
                entry["info"] = spec.info()
            except Exception as exc:  # noqa: BLE001
                entry["info_error"] = f"{type(exc).__name__}: {exc}"
        devices.append(entry)
    return devices


def _triton() -> dict[str, Any]:
    import importlib
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return {"installed": False}
    out: dict[str, Any] = {"installed": True}
    try:
        out["version"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        out["version"] = None
    try:
        importlib.import_module("triton")
        out["importable"] = True
    except Exception as exc:  # noqa: BLE001
        out["importable"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


# ----------------------------------------------------------------------------- report


class _Checks:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, status: str, message: str, hint: str | None = None) -> None:
        item = {"name": name, "status": status, "message": message}
        if hint:
            item["hint"] = hint
        self.items.append(item)


def _ext_summary(cpu: dict[str, Any]) -> str:
    ext = cpu["extensions"]
    if cpu["arch"] == "x86":
        parts = [n.upper() for n in ("avx", "avx2", "fma", "f16c") if ext.get(n)]
        if ext.get("avx_vnni"):
            parts.append("AVX-VNNI")
        if ext.get("avx512f"):
            sub = [label for key, label in (("avx512bw", "BW"), ("avx512vl", "VL"), ("avx512_vnni", "VNNI"),
                                            ("avx512_bf16", "BF16"), ("avx512_fp16", "FP16")) if ext.get(key)]
            parts.append("AVX-512" + (f" ({', '.join(sub)})" if sub else ""))
        amx = [label for key, label in (("amx_bf16", "BF16"), ("amx_int8", "INT8")) if ext.get(key)]
        if amx or ext.get("amx_tile"):
            parts.append("AMX" + (f" ({', '.join(amx)})" if amx else ""))
        return ", ".join(parts) or "none"
    return ", ".join(n.upper() if n == "neon" else n for n, ok in ext.items() if ok) or "none"


def collect() -> dict[str, Any]:
    from mistralrs import __version__
    from mistralrs.hub import hf_home, hub_cache_dir

    checks = _Checks()
    cpu = cpu_report()
    memory = memory_report()
    report: dict[str, Any] = {
        "mistralrs_version": __version__,
        "system": {
            "os": platform.platform(),
            "python": platform.python_version(),
            "cpu": cpu,
            "memory": memory,
        },
    }

    # CPU extensions.
    ext = cpu["extensions"]
    summary = _ext_summary(cpu)
    if cpu["arch"] == "x86":
        if not ext:
            checks.add("cpu_extensions", "info", "CPU feature flags unavailable on this platform")
        elif not ext.get("avx2"):
            checks.add("cpu_extensions", "warn", f"{summary} (no AVX2: CPU inference will be slow)",
                       "use a GPU or a CPU with AVX2/FMA")
        else:
            checks.add("cpu_extensions", "ok", summary)
    elif cpu["arch"] == "arm":
        checks.add("cpu_extensions", "ok" if ext.get("neon") else "warn", summary)
    else:
        checks.add("cpu_extensions", "info", f"unknown CPU architecture {cpu['machine']}")

    # torch.
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is the report's main finding
        report["torch"] = {"importable": False, "error": f"{type(exc).__name__}: {exc}"}
        checks.add("torch", "error", f"torch cannot be imported ({type(exc).__name__}: {exc})",
                   "pip install torch (see https://pytorch.org/get-started/locally/)")
        torch = None  # type: ignore[assignment]
    if torch is not None:
        cuda_ok = torch.cuda.is_available()
        mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
        report["torch"] = {
            "importable": True,
            "version": torch.__version__,
            "cuda_build": torch.version.cuda,
            "hip_build": getattr(torch.version, "hip", None),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cuda_available": cuda_ok,
            "mps_available": mps_ok,
        }
        checks.add("torch", "ok", f"{torch.__version__} (CPU capability {report['torch']['cpu_capability']}, "
                                  f"{report['torch']['threads']} threads)")

    # Plugins, registry, devices.
    registry = None
    try:
        from mistralrs.plugins import get_plugin_host

        host = get_plugin_host()
        registry = host.registry()
        failures = host.failures
        report["plugins"] = {
            "loaded": len(host.plugins),
            "failed": [{"name": f.name, "distribution": f.distribution, "version": f.version,
                        "stage": f.stage, "error": f.error} for f in failures],
        }
        if failures:
            for f in failures:
                checks.add("plugins", "warn", f.message(),
                           "upgrade or uninstall that plugin, or block it with MISTRALRS_BLOCK_PLUGINS")
        else:
            checks.add("plugins", "ok", f"{len(host.plugins)} plugins loaded, none failed")
    except Exception as exc:  # noqa: BLE001
        report["plugins"] = {"error": f"{type(exc).__name__}: {exc}"}
        checks.add("plugins", "error", f"the plugin registry cannot be built: {exc}",
                   "uninstall the conflicting plugin named above")

    devices: list[dict[str, Any]] = []
    if registry is not None and torch is not None:
        devices = _devices(registry)
        report["devices"] = devices
        cuda = next((d for d in devices if d["type"] == "cuda"), None)
        if cuda and cuda.get("available"):
            for dev in (cuda.get("info") or {}).get("devices", []):
                cap = dev.get("capability", "0.0")
                major, minor = (int(x) for x in cap.split(".")[:2])
                fa = "Flash Attention v3 capable" if (major, minor) == (9, 0) else (
                    "Flash Attention v2 capable" if major >= 8 else "no Flash Attention (needs compute 8.0+)")
                mem = dev.get("memory_bytes")
                checks.add("cuda", "ok", f"cuda:{dev['index']} {dev['name']} (compute {cap}, "
                                         f"{(mem or 0) / 1e9:.1f} GB; {fa})")
        else:
            why = (cuda or {}).get("error") or ("torch is a CPU-only build" if not torch.version.cuda
                                                and not getattr(torch.version, "hip", None) else "no GPU found")
            checks.add("cuda", "info", f"CUDA not available ({why})")
        mps = next((d for d in devices if d["type"] == "mps"), None)
        if sys.platform == "darwin":
            checks.add("mps", "ok" if mps and mps.get("available") else "info",
                       "Metal (MPS) available" if mps and mps.get("available") else "Metal (MPS) not available")
        if not any(d.get("available") for d in devices):
            checks.add("devices", "error", "no device is available (not even the CPU)",
                       "reinstall mistralrs: its device plugins are missing")

    # distribution (docs/distributed.md).
    if torch is not None:
        from mistralrs.distributed.world import distributed_report

        dist_report = distributed_report()
        report["distributed"] = dist_report
        if dist_report.get("error"):
            checks.add("distributed", "error", dist_report["error"], "fix the MISTRALRS_MN_* / torchrun variables")
        elif not dist_report.get("available"):
            checks.add("distributed", "info", "torch.distributed is not available: -tp and multi-node need it")
        else:
            backends = ", ".join(b for b, ok in dist_report["backends"].items() if ok) or "none"
            gpus = dist_report["cuda_devices"]
            span = f"{gpus} CUDA device(s): -tp up to {gpus} on this node" if gpus else "CPU ranks (gloo)"
            world = dist_report.get("rendezvous")
            described = (f"; this environment describes a world of {world['world_size']} ({dist_report['source']})"
                         if world else "")
            checks.add("distributed", "ok", f"torch.distributed with {backends}; {span}{described}")
        if dist_report.get("ring"):
            checks.add("ring", "warn", dist_report["ring"], "unset RING_CONFIG")

    # triton.
    triton = _triton()
    report["triton"] = triton
    if triton["installed"]:
        status = "ok" if triton.get("importable") else "warn"
        checks.add("triton", status, f"triton {triton.get('version') or '?'}"
                   + ("" if triton.get("importable") else f" is installed but fails to import: {triton.get('error')}"))
    else:
        checks.add("triton", "info", "triton not installed (only GPU kernels use it)")

    # Selection on the CPU with the auto dtype.
    if registry is not None and torch is not None:
        from mistralrs.dtypes import auto_dtype, dtype_name

        dt = auto_dtype("cpu")
        report["auto_dtype"] = dtype_name(dt)
        best = next((d["type"] for d in devices if d.get("available")), "cpu")
        report["best_device"] = best
        if best != "cpu":
            try:
                report["auto_dtype_" + best] = dtype_name(auto_dtype(best))
            except Exception:  # noqa: BLE001
                pass
        checks.add("dtype", "ok", f"auto dtype on cpu: {dtype_name(dt)}"
                   + ("" if dt == torch.bfloat16 else " (no native bf16 on this CPU: f32 is faster than emulated bf16)"))
        kernels: dict[str, str | None] = {}
        for op in sorted({k.op for k in registry.kernels}):
            try:
                kernels[op] = registry.kernel(op, "cpu").name
            except Exception:  # noqa: BLE001
                kernels[op] = None
        report["kernels"] = kernels
        missing = [op for op, name in kernels.items() if name is None]
        if missing:
            checks.add("kernels", "error", f"no cpu kernel for {', '.join(missing)}",
                       "reinstall mistralrs (the torch reference kernels are missing)")
        else:
            checks.add("kernels", "ok", "cpu: " + ", ".join(f"{op}={name}" for op, name in kernels.items()))
        from mistralrs.nn.kernels import kernel_report, kernel_summary

        by_device = {d: kernel_report(registry, d) for d in sorted({d for k in registry.kernels for d in k.devices})}
        report["kernels_by_device"] = by_device
        for dev, rep in by_device.items():
            if dev == "cpu":
                continue  # the line above
            fast = any(r["active"] and not r["reference"] for r in rep.values())
            checks.add("kernels", "ok" if fast else "info", f"{dev}: " + "; ".join(kernel_summary(rep)))
        quant: dict[str, dict[str, Any]] = {}
        for spec in sorted((q for q in registry.quantizers if q.isq), key=lambda q: q.name):
            kernel = kernels.get(f"qmatmul_{spec.name}")
            native = kernel is not None and not registry.kernel(f"qmatmul_{spec.name}", "cpu").reference
            quant[spec.name] = {"bits_per_weight": spec.bits_per_weight, "devices": list(spec.devices),
                                "cpu_kernel": kernel if native else None}
        report["quantization"] = quant
        if quant:
            native_types = [n for n, q in quant.items() if q["cpu_kernel"]]
            checks.add("quantization", "ok" if native_types else "info",
                       f"{len(quant)} ISQ types; native cpu kernels for "
                       f"{', '.join(native_types) if native_types else 'none'}"
                       + ("; the others run the slower dequantize-then-matmul path" if native_types else ""),
                       None if native_types else "a CPU with AVX2, FMA and F16C and a C++ compiler run the "
                       "q4_0/q8_0/q4k/q5k/q6k kernels")
        else:
            checks.add("quantization", "info", "no quantizer plugin installed: --isq is unavailable")
        try:
            backend = registry.attention_backends.select(device="cpu", dtype=str(dt).removeprefix("torch."))
            report["attention_backend"] = backend.name
            checks.add("attention", "ok", f"cpu/{dtype_name(dt)}: {backend.name}"
                       + (" (paged)" if getattr(backend, "paged", False) else ""))
        except Exception as exc:  # noqa: BLE001
            report["attention_backend"] = None
            checks.add("attention", "error", f"no attention backend for the cpu: {exc}",
                       "reinstall mistralrs (its attention plugins are missing)")
        archs = sorted(s.name for s in registry.architectures)
        report["architectures"] = archs
        if archs:
            checks.add("architectures", "ok", f"{len(archs)} architectures: {', '.join(archs)}")
        else:
            checks.add("architectures", "error", "no model architecture is registered",
                       "reinstall mistralrs (its model plugins are missing)")

    # Hugging Face cache, token, connectivity, disk.
    cache = hub_cache_dir()
    writable, why = cache_writable(cache)
    tok = token_report()
    hf: dict[str, Any] = {"home": str(hf_home()), "cache_dir": str(cache), "cache_exists": cache.is_dir(),
                          "cache_writable": writable, "token_found": tok["found"], "token_source": tok["source"],
                          "offline": False}
    from mistralrs.hub import is_offline

    hf["offline"] = is_offline()
    report["hf"] = hf
    if writable:
        checks.add("hf_cache", "ok", f"{cache} is writable" + (f" ({why})" if why else ""))
    else:
        checks.add("hf_cache", "warn", f"{cache} is not writable ({why}): models cannot be downloaded",
                   "fix its permissions, or point HF_HOME / HF_HUB_CACHE / --hf-cache elsewhere")
    if tok["found"]:
        checks.add("hf_token", "ok", f"token found ({tok['source']})")
    elif tok.get("error"):
        checks.add("hf_token", "warn", f"token file {tok['path']} cannot be read ({tok['error']})",
                   "fix its permissions or run `mistralrs login` again")
    else:
        checks.add("hf_token", "info", "no Hugging Face token (needed only for gated or private models)",
                   "run `mistralrs login` or set HF_TOKEN")
    conn = connectivity_report(tok["found"])
    hf["connectivity"] = conn
    if not conn["checked"]:
        checks.add("hf_connectivity", "info", f"skipped ({conn['reason']})")
    elif conn.get("reachable"):
        msg = f"{conn['endpoint']} reachable"
        if conn.get("token_valid") is True:
            msg += "; token accepted"
        if conn.get("token_valid") is False:
            checks.add("hf_connectivity", "warn", msg + f"; token rejected (HTTP {conn.get('token_status')})",
                       "create a new token at https://huggingface.co/settings/tokens and run `mistralrs login`")
        else:
            checks.add("hf_connectivity", "ok", msg)
    else:
        checks.add("hf_connectivity", "warn", f"{conn['endpoint']} unreachable ({conn.get('error')})",
                   "check your network or proxy; set HF_HUB_OFFLINE=1 to use cached models only")
    where = _existing_ancestor(cache)
    try:
        usage = shutil.disk_usage(where)
        report["disk"] = {"path": str(where), "free_bytes": usage.free, "total_bytes": usage.total}
        free = f"{usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB at {where}"
        if usage.free < LOW_DISK_BYTES:
            checks.add("disk", "warn", free + " (low)", "free some space, e.g. `mistralrs cache delete -m MODEL`")
        else:
            checks.add("disk", "ok", free)
    except OSError as exc:
        report["disk"] = {"path": str(where), "error": exc.strerror or str(exc)}
        checks.add("disk", "warn", f"cannot read free space at {where}: {exc.strerror or exc}")

    report["checks"] = checks.items
    report["ok"] = not any(c["status"] == "error" for c in checks.items)
    return report


def _print_human(report: dict[str, Any]) -> None:
    sysinfo = report["system"]
    cpu, mem = sysinfo["cpu"], sysinfo["memory"]
    torch_info = report.get("torch") or {}
    print("mistralrs doctor")
    print(f"mistralrs {report['mistralrs_version']}, Python {sysinfo['python']}"
          + (f", torch {torch_info['version']}" if torch_info.get("version") else ""))
    print(f"OS: {sysinfo['os']}")
    print(f"CPU: {cpu['brand'] or 'unknown'} ({cpu['machine']}, {cpu['logical_cores']} logical cores)")
    if mem.get("total_bytes"):
        avail = mem.get("available_bytes")
        print(f"RAM: {mem['total_bytes'] / 1e9:.1f} GB total"
              + (f", {avail / 1e9:.1f} GB available" if avail is not None else ""))
    print()
    labels = {"ok": "OK", "info": "INFO", "warn": "WARN", "error": "ERROR"}
    for check in report["checks"]:
        print(f"[{labels[check['status']]}] {check['name']}: {check['message']}")
        if check.get("hint") and check["status"] in ("warn", "error"):
            print(f"         hint: {check['hint']}")
    print()
    n_warn = sum(c["status"] == "warn" for c in report["checks"])
    n_err = sum(c["status"] == "error" for c in report["checks"])
    if n_err:
        print(f"{n_err} error(s), {n_warn} warning(s): models cannot run until the errors are fixed.")
    else:
        print(f"Ready to run models ({n_warn} warning(s)).")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_human(report)
    return 0 if report["ok"] else 1
