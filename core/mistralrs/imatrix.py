"""Importance matrices (imatrix) for ISQ: which input columns of each layer matter, so the
quantizers can spend their precision there (llama.cpp's ``--imatrix``; docs/quantization.md).

An imatrix holds, per linear layer, the mean of the squared activations entering each input
column over some calibration text: a float vector of ``in_features`` (MoE expert tensors from
llama.cpp hold one per expert, end to end). The k-quant (and q4_0 ... q5_1) quantizers weight
their rounding error by it (``QuantizedLinearMethod.importance``, set by `IsqPlan.method_for`).

Files (`read_imatrix`, by content, not name):

- mistral.rs's ``.cimatrix`` (keys are this model's layer names): u64 count, then per entry u64
  key length, key bytes, u64 value count, f32 values (little-endian). `save_cimatrix` writes it.
- llama.cpp's GGUF imatrix (``llama-imatrix`` today): tensors ``<name>.in_sum2`` and
  ``<name>.counts`` (F32); values = sums / count per expert (1 where an expert saw no token).
- llama.cpp's legacy ``.imatrix``: i32 entry count, then per entry i32 name length, name, i32
  ncall, i32 value count, f32 values (already divided by the rows of a call); values / ncall.

llama.cpp's names (``blk.3.attn_q.weight``, ``output.weight``) are mapped to ours
(`llama_cpp_names`); a layer with no entry is quantized without importance.

``--calibration-file TEXT``: `collect_imatrix` runs the tokenized text through the loaded float
model (`serving.load_quantized` then loads with ``--isq`` and the result) in windows of 512 tokens, observing every `Linear`'s input (fused projections are unfused
for the run so each layer sees its own input) and the final hidden states as the LM head's
(``lm_head``, also for a tied head; the logits are not computed).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mistralrs.errors import ConfigError

CALIBRATION_WINDOW = 512  # tokens per forward (llama-imatrix's default context)

_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$")
# Our layer-name suffixes (after ``layers.N.``) -> llama.cpp tensor keys, in order of preference.
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("attn_q", "attn_qkv"),
    "self_attn.k_proj": ("attn_k", "attn_qkv"),
    "self_attn.v_proj": ("attn_v", "attn_qkv"),
    "self_attn.qkv_proj": ("attn_qkv",),
    "self_attn.o_proj": ("attn_output",),
    "self_attn.dense": ("attn_output",),
    "mlp.gate_proj": ("ffn_gate",),
    "mlp.up_proj": ("ffn_up",),
    "mlp.gate_up_proj": ("ffn_up",),
    "mlp.down_proj": ("ffn_down",),
    "mlp.fc1": ("ffn_up",),
    "mlp.fc2": ("ffn_down",),
    "mlp.c_fc": ("ffn_up",),
    "mlp.c_proj": ("ffn_down",),
    "mlp.gate": ("ffn_gate_inp",),
    "block_sparse_moe.gate": ("ffn_gate_inp",),
}
_EXPERT_KEYS = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps",
                "w3": "ffn_up_exps", "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}


def llama_cpp_names(name: str) -> list[tuple[str, int | None]]:
    """The llama.cpp imatrix entries that may hold layer `name`'s vector: [(entry, expert)] where
    `expert` picks one slice of a stacked experts entry (None: the whole entry)."""
    if name in ("lm_head", "model.lm_head") or name.endswith(".lm_head"):
        return [("output.weight", None)]
    m = _LAYER.match(name)
    if m is None:
        return []
    index, rest = m.groups()
    e = _EXPERT.match(rest)
    if e is not None and e[2] in _EXPERT_KEYS:
        return [(f"blk.{index}.{_EXPERT_KEYS[e[2]]}.weight", int(e[1]))]
    return [(f"blk.{index}.{key}.weight", None) for key in _BLOCK_KEYS.get(rest, ())]


class Imatrix:
    """Per-layer importance vectors, keyed by our layer names (``by_layer``) or llama.cpp's
    tensor names (``by_llama_name``)."""

    def __init__(self, *, by_layer: dict[str, torch.Tensor] | None = None,
                 by_llama_name: dict[str, torch.Tensor] | None = None, source: str = "") -> None:
        self.by_layer = by_layer or {}
        self.by_llama_name = by_llama_name or {}
        self.source = source
        self.used: set[str] = set()

    def __len__(self) -> int:
        return len(self.by_layer) + len(self.by_llama_name)

    def for_layer(self, name: str, in_features: int) -> torch.Tensor | None:
        """Layer `name`'s importance ([in_features] float32), or None when the file has none."""
        vec = self.by_layer.get(name)
        if vec is None:
            for entry, expert in llama_cpp_names(name):
                found = self.by_llama_name.get(entry)
                if found is None:
                    continue
                if expert is not None:
                    if found.numel() < (expert + 1) * in_features:
                        continue
                    found = found[expert * in_features:(expert + 1) * in_features]
                vec = found
                break
        if vec is None:
            return None
        if vec.numel() != in_features:
            raise ConfigError(f"{self.source}: the importance of {name} has {vec.numel()} values, the layer takes "
                              f"{in_features} inputs; the imatrix was made for another model")
        if not bool((vec > 0).any()):
            return None  # all zeros (a layer that saw nothing): weighting by it would zero the weights
        self.used.add(name)
        return vec.reshape(in_features).to(torch.float32)


# ------------------------------------------------------------------------------------ files


def read_imatrix(path: str | Path) -> Imatrix:
    """An imatrix file (.cimatrix, llama.cpp's GGUF or legacy format); one-line ConfigErrors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--imatrix {path}: no such file")
    data = path.read_bytes()
    where = f"--imatrix {path}"
    try:
        if data[:4] == b"GGUF":
            return _read_gguf(path, where)
        if path.suffix == ".cimatrix":
            return Imatrix(by_layer=_read_cimatrix(data), source=where)
        return Imatrix(by_llama_name=_read_legacy(data), source=where)
    except (struct.error, ValueError, UnicodeDecodeError, IndexError) as exc:
        raise ConfigError(f"{where}: not a readable imatrix ({exc}); give a llama.cpp .imatrix/.gguf imatrix or "
                          "a .cimatrix file") from None


def _read_cimatrix(data: bytes) -> dict[str, torch.Tensor]:
    (count,), pos = struct.unpack_from("<Q", data, 0), 8
    out = {}
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        (nval,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        if pos + 4 * nval > len(data):
            raise ValueError(f"entry {key!r} runs past the end of the file")
        out[key] = torch.frombuffer(bytearray(data[pos:pos + 4 * nval]), dtype=torch.float32)
        pos += 4 * nval
    return out


def _read_legacy(data: bytes) -> dict[str, torch.Tensor]:
    (count,), pos = struct.unpack_from("<i", data, 0), 4
    if count < 1:
        raise ValueError("no entries")
    out = {}
    for _ in range(count):
        (n,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + n].decode("utf-8")
        pos += 4 + n
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"entry {name!r} has a bad value count")
        values = torch.frombuffer(bytearray(data[pos:pos + 4 * nval]), dtype=torch.float32)
        pos += 4 * nval
        out[name] = values / ncall if ncall > 0 else values
    return out


def _read_gguf(path: Path, where: str) -> Imatrix:
    from mistralrs.gguf.reader import GgufFile

    gguf = GgufFile.open(path)
    try:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        for info in gguf.tensors.values():
            for suffix, into in ((".in_sum2", sums), (".counts", counts)):
                if info.name.endswith(suffix):
                    into[info.name[: -len(suffix)]] = gguf.tensor(info.name).reshape(-1).to(torch.float32).clone()
        out = {}
        for name, s in sums.items():
            c = counts.get(name)
            if c is None:
                raise ValueError(f"{name}.in_sum2 has no {name}.counts")
            per = s.reshape(c.numel(), -1)
            out[name] = torch.where(c.reshape(-1, 1) > 0, per / c.round().clamp(min=1).reshape(-1, 1),
                                    torch.ones_like(per)).reshape(-1)
        return Imatrix(by_llama_name=out, source=where)
    finally:
        gguf.close()


def save_cimatrix(imatrix: Imatrix, path: str | Path) -> Path:
    """Write the layer-keyed vectors as mistral.rs's ``.cimatrix``."""
    path = Path(path)
    parts = [struct.pack("<Q", len(imatrix.by_layer))]
    for key, vec in imatrix.by_layer.items():
        raw = key.encode("utf-8")
        values = vec.to(torch.float32).contiguous()
        parts += [struct.pack("<Q", len(raw)), raw, struct.pack("<Q", values.numel()), values.numpy().tobytes()]
    path.write_bytes(b"".join(parts))
    return path


# ------------------------------------------------------------------------------ calibration


def calibration_ids(tokenizer: Any, path: str | Path) -> list[int]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--calibration-file {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise ConfigError(f"--calibration-file {path}: the text is empty; give a text of a few thousand tokens")
    return list(ids)


def collect_imatrix(model: torch.nn.Module, ids: Iterable[int], *, window: int = CALIBRATION_WINDOW,
                    source: str = "calibration") -> Imatrix:
    """Run `ids` through `model` (loaded, float) in windows, and return the mean squared input
    of every `Linear` per input column."""
    from mistralrs.loading import build_attention_backend
    from mistralrs.nn.linear import Linear

    ids = list(ids)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def observe(name: str) -> Any:
        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            acc = sums.get(name)
            sq = (x * x).sum(0)
            sums[name] = sq if acc is None else acc + sq
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    for module in model.modules():
        if getattr(module, "_gate_up", None) is not None:
            object.__setattr__(module, "_gate_up", None)  # gate and up each see their input (weights unchanged)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            hooks.append(module.register_forward_pre_hook(observe(name)))
    device = next(iter(model.parameters())).device
    backend = build_attention_backend(model, name="sdpa", device=device)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                chunk = ids[start:start + window]
                if not chunk:
                    break
                t = torch.tensor(chunk, dtype=torch.int64, device=device)
                pos = torch.arange(len(chunk), dtype=torch.int64, device=device)
                hidden = model(t, pos, backend.batch([0, len(chunk)], [len(chunk)]))
                observe("lm_head")(None, (hidden,))  # the LM head's input (tied or not), without the logits
    finally:
        for h in hooks:
            h.remove()
    return Imatrix(by_layer={n: sums[n] / rows[n] for n in sums}, source=source)
