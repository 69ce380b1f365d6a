"""`mistralrs plugins [--json] [--kernels]`: what is installed, where it came from, what it registered;
with --kernels, the kernel selected per op on each device type and why the others are not used (that
probes the devices, so it imports torch; plain `mistralrs plugins` stays cheap)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--kernels", action="store_true",
                        help="also list the kernel selected per op on each device and why the others are not "
                             "(probes the devices: imports torch)")


def collect(*, kernels: bool = False) -> dict[str, Any]:
    from mistralrs.plugins import get_plugin_host

    host = get_plugin_host()
    registry = host.registry()
    plugins = []
    for name, info in sorted(host.plugins.items()):
        plugins.append({
            "name": name,
            "module": info.module,
            "distribution": info.distribution,
            "version": info.version,
            "first_party": info.first_party,
            "hooks": host.hooks_of(name),
            "registered": registry.registered_by.get(name, {}),
        })
    failed = [
        {"name": f.name, "distribution": f.distribution, "version": f.version, "stage": f.stage, "error": f.error}
        for f in host.failures
    ]
    data: dict[str, Any] = {"plugins": plugins, "failed": failed}
    if kernels:
        from mistralrs.nn.kernels import kernel_report

        devices = sorted({d for k in registry.kernels for d in k.devices})
        data["kernels"] = {device: kernel_report(registry, device) for device in devices}
    return data


def run(args: argparse.Namespace) -> int:
    data = collect(kernels=args.kernels)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for p in data["plugins"]:
        origin = f"{p['distribution']} {p['version']}" if p["distribution"] else "built in"
        print(f"{p['name']}  [{origin}]  {p['module']}")
        print(f"    hooks: {', '.join(p['hooks']) or '-'}")
        for kind, names in sorted(p["registered"].items()):
            print(f"    {kind}: {', '.join(names)}")
    for f in data["failed"]:
        print(f"{f['name']}  [{f['distribution'] or '?'} {f['version'] or ''}]  FAILED to {f['stage']}: {f['error']}")
    from mistralrs.nn.kernels import kernel_summary

    if "kernels" in data:
        print("kernels per device (the selected one per op; why the others are not used):")
        for device, report in data["kernels"].items():
            for i, line in enumerate(kernel_summary(report)):
                print(f"  {device + ':' if i == 0 else ' ' * (len(device) + 1)} {line}")
    print(f"{len(data['plugins'])} plugins loaded, {len(data['failed'])} failed")
    return 0
