"""Checkpoints published already quantized (docs/prequantized.md): ``config.json``'s
``quantization_config.quant_method`` selects the quantizer plugin that loads them.

    found = checkpoint_format(config, registry, config_path)   # (spec, quantization_config) or None
    names = checkpoint_names(weight_files)                      # {tensor name: shape} of the checkpoint

`loading.assign_checkpoint_methods` then gives the layers their methods on the meta-device model.

The plugin is the registered quantizer whose `QuantizerSpec.checkpoint_formats` lists the
``quant_method`` (a config with ``bits`` and ``group_size`` but no ``quant_method`` is MLX's
``afq``, as mistral.rs reads it); an unknown one is a one-line error listing the supported
formats. A `Linear` gets the plugin's `CheckpointLinearMethod` when the checkpoint holds its
``<layer>.<marker>`` tensor (``qweight`` for GPTQ/AWQ), so layers published in float (usually the
LM head, ``modules_to_not_convert``) stay float. Nothing here names a format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError


def _quant_config(config: dict) -> dict | None:
    qc = config.get("quantization_config")
    if qc is None:
        qc = config.get("quantization")  # MLX's key
    return qc if isinstance(qc, dict) else None


def checkpoint_format(config: dict, registry: Any, where: Path | str = "config.json") -> tuple[Any, dict] | None:
    """(QuantizerSpec, quantization_config) of a pre-quantized checkpoint; None for a float one."""
    qc = _quant_config(config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method is None and "bits" in qc and "group_size" in qc:
        method = "afq"
    if not isinstance(method, str) or not method.strip():
        raise ModelLoadError(f"{where}: quantization_config has no quant_method; expected one of: "
                             f"{', '.join(registry.checkpoint_formats()) or 'none installed'}")
    spec = registry.quantizer_for_checkpoint(method)
    if spec is None:
        raise ModelLoadError(
            f"{where}: quantization_config.quant_method {method!r} is not supported; expected one of: "
            f"{', '.join(registry.checkpoint_formats()) or 'none installed'} (a quantizer plugin adds a format)"
        )
    return spec, qc


def checkpoint_names(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the safetensors files with its shape (headers only)."""
    import struct

    names: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read the safetensors header ({exc}); download the file again") from None
        names.update((k, tuple(v.get("shape", ()))) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    return names


def describe_checkpoint(config: dict, registry: Any) -> str | None:
    """One line on a checkpoint's published quantization (`mistralrs tune`); None for a float one."""
    qc = _quant_config(config)
    if qc is None:
        return None
    try:
        found = checkpoint_format(config, registry)
    except ModelLoadError as exc:
        return str(exc).removeprefix("config.json: ")
    assert found is not None
    spec, qc = found
    flat = dict(qc)
    nested = qc.get("quant_config")  # HQQ's one config for every layer (a per-layer-tag config is not summed up)
    if isinstance(nested, dict) and isinstance(nested.get("weight_quant_params"), dict):
        flat.update(nested["weight_quant_params"])
    details = [f"{k}={flat[k]}" for k in ("bits", "nbits", "group_size", "axis", "weight_block_size",
                                          "bnb_4bit_quant_type", "load_in_8bit", "desc_act", "sym", "version")
               if k in flat]
    shown = f" ({', '.join(details)})" if details else ""
    return f"{qc.get('quant_method') or 'afq'}{shown}, loaded as published by the {spec.name} plugin"
