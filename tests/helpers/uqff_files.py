"""A minimal UQFF 1.2.0 writer and reader for tests, written from mistral.rs's layout description
(`reference/uqff-format.md`, the per-family ``serialize_uqff``) and sharing no code with
`mistralrs.uqff`: numpy arrays, `gguf.quants` for the GGML blocks, safetensors' own numpy writer.

    write_uqff_q8_0(checkpoint_dir, out_dir, quantized=is_linear, stacked={...})
    records = read_uqff(shard_path)          # {key: {suffix: tensor}}, version checked
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

Q8_0 = 8  # ggml type id, which is also mistral.rs's UQFF code for Q8_0
GGUF_FAMILY = 0  # QuantizedSerdeType::Gguf
UNQUANT_FAMILY = 1  # QuantizedSerdeType::Unquant


def version_arrays(major: int = 1, minor: int = 2, patch: int = 0) -> dict[str, np.ndarray]:
    return {"uqff.version.major": np.array(major, dtype=np.uint32),
            "uqff.version.minor": np.array(minor, dtype=np.uint32),
            "uqff.version.patch": np.array(patch, dtype=np.uint32)}


def read_checkpoint(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def gguf_record(key: str, weight: np.ndarray) -> dict[str, np.ndarray]:
    """A Q8_0 record of a [..., out, in] float weight, blocks by `gguf.quants.quantize`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.ascontiguousarray(weight, dtype=np.float32)
    blocks = quantize(w.reshape(-1, w.shape[-1]), GGMLQuantizationType.Q8_0)
    return {
        f"{key}.weight.format": np.array(GGUF_FAMILY, dtype=np.uint8),
        f"{key}.weight": np.ascontiguousarray(blocks).reshape(-1).view(np.uint8),
        f"{key}.weight.dtype": np.array(Q8_0, dtype=np.uint32),
        f"{key}.weight.shape": np.array(list(w.shape), dtype=np.uint32),
    }


def write_uqff_q8_0(model_dir: Path, out_dir: Path, *, quantized: Callable[[str], bool],
                    unquantized: Callable[[str], bool] = lambda _k: False,
                    stacked: dict[str, list[str]] | None = None, name: str = "q8_0-0.uqff",
                    version: tuple[int, int, int] = (1, 2, 0), copy_assets: bool = True) -> Path:
    """A UQFF directory from a HF checkpoint: weights whose key `quantized(key)` says become Q8_0
    records, `unquantized(key)` float records (family 1), `stacked` {record key: [checkpoint weight
    names of each expert]} stacked expert records; everything else goes to the residual file."""
    tensors = read_checkpoint(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = version_arrays(*version)
    residual = {}
    used: set[str] = set()
    for key, names in (stacked or {}).items():
        shard.update(gguf_record(key, np.stack([tensors[n] for n in names])))
        used.update(names)
    for name, t in tensors.items():
        if name in used:
            continue
        key = name.removesuffix(".weight")
        if name.endswith(".weight") and quantized(key):
            shard.update(gguf_record(key, t))
        elif name.endswith(".weight") and unquantized(key):
            shard[f"{key}.weight.format"] = np.array(UNQUANT_FAMILY, dtype=np.uint8)
            shard[f"{key}.weight"] = t
        else:
            residual[name] = t
    meta = {"uqff.producer": "tests", "uqff.version": ".".join(map(str, version))}
    save_file(shard, str(out_dir / name), metadata=meta)
    save_file(residual, str(out_dir / "residual.safetensors"), metadata=meta)
    if copy_assets:
        for asset in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(model_dir) / asset).is_file():
                shutil.copy(Path(model_dir) / asset, out_dir / asset)
    return out_dir / name


def read_uqff(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a shard: {key: {suffix: torch tensor}} (torch: numpy has no FP8); asserts
    the 1.2.0 version entries."""
    import torch

    with safe_open(str(path), framework="pt") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    for part, want in zip(("major", "minor", "patch"), (1, 2, 0)):
        v = arrays.pop(f"uqff.version.{part}")
        assert v.dtype == torch.uint32 and v.dim() == 0 and int(v.item()) == want, (part, v)
    keys = [k.removesuffix(".weight.format") for k in arrays if k.endswith(".weight.format")]
    records: dict[str, dict[str, Any]] = {k: {} for k in keys}
    for name, a in arrays.items():
        owner = max((k for k in keys if name.startswith(k + ".")), key=len, default=None)
        assert owner is not None, f"{path.name}: {name} belongs to no record"
        records[owner][name[len(owner) + 1:]] = a
    return records


def read_report(directory: Path) -> dict:
    return json.loads((Path(directory) / "uqff_report.json").read_text())
