"""GPTQ and AWQ checkpoints written from a float HF checkpoint with the published formulas
(AutoGPTQ's ``Quantizer`` round-to-nearest and ``QuantLinear.pack``, AutoAWQ's GEMM ``pack``),
in numpy, sharing no code with the loaders. Returns the dequantized weights the packed tensors
stand for, computed from the codes before packing.

    path, dequantized = write_packed(src, dst, "gptq", bits=4, group_size=32, sym=True)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _copy_source(src: Path, dst: Path, framework: str = "np") -> dict:
    """Copy `src`'s files but its weights into `dst`; return its tensors (numpy or torch)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework=framework) as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _rtn(w: np.ndarray, bits: int, groups: np.ndarray, n_groups: int, sym: bool):
    """AutoGPTQ's quantizer per (group, output): codes [out, in], scales fp16 [G, out], zeros [G, out]."""
    maxq = (1 << bits) - 1
    out_f, in_f = w.shape
    scales = np.zeros((n_groups, out_f), np.float16)
    zeros = np.zeros((n_groups, out_f), np.int64)
    codes = np.zeros((out_f, in_f), np.int64)
    for g in range(n_groups):
        cols = np.nonzero(groups == g)[0]
        x = w[:, cols]
        xmin = np.minimum(x.min(1), 0)
        xmax = np.maximum(x.max(1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        same = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(same, -1, xmin), np.where(same, 1, xmax)
        scale = ((xmax - xmin) / maxq).astype(np.float16)  # stored in fp16; rounding uses the stored scale
        s32 = scale.astype(np.float32)
        zero = np.full(out_f, (maxq + 1) // 2) if sym else np.round(-xmin / s32).astype(np.int64)
        codes[:, cols] = np.clip(np.round(x / s32[:, None]) + zero[:, None], 0, maxq)
        scales[g], zeros[g] = scale, zero
    return codes, scales, zeros


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] codes -> int32 [R * bits / 32, C]: 32/bits consecutive rows per word, the first lowest."""
    n = 32 // bits
    v = values.astype(np.uint32).reshape(values.shape[0] // n, n, values.shape[1])
    out = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for k in range(n):
        out |= v[:, k, :] << np.uint32(bits * k)
    return out.view(np.int32)


def _pack_cols(values: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    n = 32 // bits
    v = values.astype(np.uint32).reshape(values.shape[0], values.shape[1] // n, n)
    out = np.zeros(v.shape[:2], np.uint32)
    for k in range(n):
        out |= v[:, :, order[k] if order else k] << np.uint32(bits * k)
    return out.view(np.int32)


def write_packed(src: Path, dst: Path, fmt: str, *, bits: int = 4, group_size: int = 32, sym: bool = True,
                 desc_act: bool = False, v2: bool = False, seed: int = 0,
                 quantized=lambda name: name.endswith("_proj.weight")) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of the checkpoint `src` with every weight `quantized(name)` selects stored as `fmt`
    ("gptq" or "awq"); returns (dst, {weight name: dequantized float32 [out, in]})."""
    rng = np.random.default_rng(seed)
    tensors = _copy_source(src, dst, "np")
    out, dequantized = {}, {}
    for name, t in tensors.items():
        n = 32 // bits
        if not quantized(name) or t.ndim != 2 or t.shape[1] % max(n, 32) or t.shape[0] % max(n, 8):
            out[name] = t  # (a shape the packing cannot take stays float, as quantizers leave it)
            continue
        w = t.astype(np.float32)
        out_f, in_f = w.shape
        g = in_f if group_size == -1 else group_size
        n_groups = -(-in_f // g)
        order = rng.permutation(in_f) if desc_act else np.arange(in_f)
        groups = np.empty(in_f, np.int64)
        groups[order] = np.arange(in_f) // g  # column order[j] is the j-th processed: group j // g
        codes, scales, zeros = _rtn(w, bits, groups, n_groups, sym)
        dequantized[name] = ((codes - zeros[groups].T) * scales[groups].T.astype(np.float32)).astype(np.float32)
        layer = name.removesuffix(".weight")
        if fmt == "gptq":
            out[f"{layer}.qweight"] = _pack_rows(codes.T, bits)
            out[f"{layer}.qzeros"] = _pack_cols(zeros - (0 if v2 else 1), bits)
            out[f"{layer}.scales"] = scales
            if desc_act:
                out[f"{layer}.g_idx"] = groups.astype(np.int32)
        elif fmt == "awq":
            assert bits == 4 and not desc_act
            out[f"{layer}.qweight"] = _pack_cols(codes.T, 4, AWQ_ORDER)
            out[f"{layer}.qzeros"] = _pack_cols(zeros, 4, AWQ_ORDER)
            out[f"{layer}.scales"] = scales
        else:
            raise ValueError(fmt)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if fmt == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": desc_act, "sym": sym,
                                         "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dequantized


def write_dequantized(src: Path, dst: Path, dequantized: dict[str, np.ndarray]) -> Path:
    """The float checkpoint `src` with the dequantized weights in place of the originals."""
    tensors = _copy_source(src, dst, "np")
    tensors.update(dequantized)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def write_fp8(src: Path, dst: Path, *, block: tuple[int, int] | None = (128, 128),
              quantized=lambda name: name.endswith("_proj.weight"),
              not_convert: tuple[str, ...] = ()) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of `src` in the fine-grained FP8 layout (transformers' FP8 / DeepSeek-V3): per
    `block` (or per tensor) ``scale = amax / 448``, ``weight = e4m3(w / scale)`` and
    ``weight_scale_inv = scale``; returns (dst, {weight name: dequantized float32})."""
    import torch
    from safetensors.torch import save_file as save_torch

    tensors = _copy_source(src, dst, "pt")
    out, dequantized = {}, {}
    for name, t in tensors.items():
        layer = name.removesuffix(".weight")
        if not quantized(name) or any(layer.endswith(m) for m in not_convert):
            out[name] = t
            continue
        w = t.float()
        o, i = w.shape
        bo, bi = block or (o, i)
        scale = torch.zeros(-(-o // bo), -(-i // bi))
        q = torch.empty(o, i, dtype=torch.float8_e4m3fn)
        for r in range(scale.shape[0]):
            for c in range(scale.shape[1]):
                tile = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi]
                s = tile.abs().max().clamp(min=1e-12) / 448.0
                scale[r, c] = s
                q[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = (tile / s).to(torch.float8_e4m3fn)
        rows = torch.arange(o) // bo
        cols = torch.arange(i) // bi
        dequantized[name] = (q.float() * scale[rows][:, cols]).numpy()
        out[name] = q
        out[f"{layer}.weight_scale_inv"] = scale if block else scale.reshape(())
    save_torch(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block:
        qc["weight_block_size"] = list(block)
    if not_convert:
        qc["modules_to_not_convert"] = list(not_convert)
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dequantized


def write_bnb(src: Path, dst: Path, *, kind: str = "nf4", nested: bool = True, int8: bool = False,
              quantized=lambda name: name.endswith("_proj.weight")) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of `src` quantized by bitsandbytes itself (its CPU functions), serialized as
    transformers does (``QuantState.as_dict(packed=True)`` under ``<layer>.weight.``, or int8 +
    ``SCB``); returns (dst, {weight name: bitsandbytes' own dequantization, float32})."""
    import bitsandbytes.functional as BF
    import torch
    from safetensors.torch import save_file as save_torch

    tensors = _copy_source(src, dst, "pt")
    out, dequantized = {}, {}
    for name, t in tensors.items():
        if not quantized(name):
            out[name] = t
            continue
        layer = name.removesuffix(".weight")
        w = t.float()
        if int8:
            scb = w.abs().amax(1).clamp(min=1e-12)
            q = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)  # LLM.int8's row-wise absmax
            out[name], out[f"{layer}.SCB"] = q, scb
            dequantized[name] = (q.float() * scb[:, None] / 127.0).numpy()
            continue
        q, state = BF.quantize_4bit(w, quant_type=kind, blocksize=64, compress_statistics=nested)
        out[name] = q
        for key, value in state.as_dict(packed=True).items():
            out[f"{name}.{key}"] = value
        dequantized[name] = BF.dequantize_4bit(q, state).float().numpy()
    save_torch(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if int8:
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    else:
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                         "bnb_4bit_quant_type": kind, "bnb_4bit_use_double_quant": nested,
                                         "bnb_4bit_compute_dtype": "float32"}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dequantized


def _pack_bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] codes -> uint32 [R, C * bits / 32]: each row one little-endian bit stream, code j at
    bit j * bits (MLX's layout, codes may straddle words)."""
    rows, cols = codes.shape
    words = cols * bits // 32
    acc = np.zeros((rows, words + 1), np.uint64)
    offsets = np.arange(cols, dtype=np.uint64) * np.uint64(bits)
    word, shift = (offsets // 32).astype(np.int64), offsets % np.uint64(32)
    value = codes.astype(np.uint64) << shift
    for r in range(rows):
        np.add.at(acc[r], word, value[r] & np.uint64(0xFFFFFFFF))
        np.add.at(acc[r], word + 1, value[r] >> np.uint64(32))
    return acc[:, :words].astype(np.uint32)


def write_mlx(src: Path, dst: Path, *, bits: int = 4, group_size: int = 64,
              quantized=lambda name: name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight"))
              ) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of `src` as mlx_lm writes a quantized model: ``weight`` uint32 codes, ``scales`` and
    ``biases`` float16 per group (w = q * scale + bias), ``quantization`` in config.json, token
    embeddings included; returns (dst, {weight name: dequantized float32})."""
    tensors = _copy_source(src, dst, "np")
    out, dequantized = {}, {}
    levels = (1 << bits) - 1
    for name, t in tensors.items():
        if not quantized(name) or t.ndim != 2 or t.shape[1] % group_size or (t.shape[1] * bits) % 32:
            out[name] = t
            continue
        w = t.astype(np.float32)
        rows, cols = w.shape
        g = w.reshape(rows, cols // group_size, group_size)
        lo, hi = g.min(-1), g.max(-1)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float16)
        bias = lo.astype(np.float16)
        s32, b32 = scale.astype(np.float32)[..., None], bias.astype(np.float32)[..., None]
        q = np.clip(np.round((g - b32) / s32), 0, levels).astype(np.int64)
        dequantized[name] = (q * s32 + b32).reshape(rows, cols).astype(np.float32)
        layer = name.removesuffix(".weight")
        out[name] = _pack_bitstream(q.reshape(rows, cols), bits)
        out[f"{layer}.scales"], out[f"{layer}.biases"] = scale, bias
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dequantized


def write_hqq(src: Path, dst: Path, *, nbits: int = 4, group_size: int = 64, axis: int = 1,
              compute_dtype: str = "float32", dynamic: dict[str, dict] | None = None,
              quantized=lambda name: name.endswith("_proj.weight")) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of `src` quantized by hqq itself (``HQQLinear`` on CPU), saved as transformers'
    ``HqqConfig`` does: each layer's ``HQQLinear.state_dict()`` under its name, the config's
    ``quant_config`` / ``skip_modules``. `dynamic` ({layer tag: {nbits, group_size, axis}}) gives
    tags their own settings (transformers' ``dynamic_config``). Returns (dst, {weight name: hqq's
    own ``dequantize()``, float32})."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors.torch import save_file as save_torch

    dtype = getattr(torch, compute_dtype)
    tensors = _copy_source(src, dst, "pt")
    out, dequantized = {}, {}

    def settings(name: str) -> dict:
        if dynamic is None:
            return {"nbits": nbits, "group_size": group_size, "axis": axis}
        tag = ".".join(p for p in name.removesuffix(".weight").split(".") if p not in ("model", "layers") and not p.isdigit())
        return dynamic[tag]

    for name, t in tensors.items():
        if not quantized(name):
            out[name] = t
            continue
        layer = name.removesuffix(".weight")
        linear = torch.nn.Linear(t.shape[1], t.shape[0], bias=False)
        linear.weight.data.copy_(t.float())
        hqq_layer = HQQLinear(linear, BaseQuantizeConfig(**settings(name)), compute_dtype=dtype, device="cpu")
        for key, value in hqq_layer.state_dict().items():
            out[f"{layer}.{key}"] = value.contiguous()
        dequantized[name] = hqq_layer.dequantize().float().numpy()
    save_torch(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if dynamic is None:
        quant_config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)
    else:
        quant_config = {tag: BaseQuantizeConfig(**s) for tag, s in dynamic.items()}
    config["quantization_config"] = {"quant_config": quant_config, "quant_method": "hqq", "skip_modules": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dequantized


E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def pack_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., rows, in] -> (blocks uint8 [..., rows, in / 32, 16], scales uint8 [..., rows, in / 32])
    by the OCP microscaling recipe: per block of 32 the e8m0 scale 2^(ceil(log2(amax / 6))) (so
    every value fits), each value rounded to the nearest e2m1 code, two codes per byte with the
    even element in the low nibble (GPT-OSS's layout)."""
    *lead, cols = w.shape
    g = w.reshape(*lead, cols // 32, 32).astype(np.float32)
    amax = np.abs(g).max(-1)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0))
    scales = np.clip(exp + 127, 1, 254).astype(np.uint8)
    x = g / np.exp2(scales.astype(np.float32) - 127)[..., None]
    # the nearest e2m1 magnitude (ties: the smaller one), the sign bit on nonzero codes
    codes = np.searchsorted(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32), np.abs(x)).astype(np.uint8)
    codes |= ((x < 0) & (codes > 0)).astype(np.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, scales


def write_mxfp4(src: Path, dst: Path, *, quantized=lambda name: name.endswith("_proj.weight"),
                fused_experts: tuple[str, str, str] | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of `src` with the selected linear weights as MXFP4 (``<layer>.blocks`` [out, in / 2],
    ``<layer>.scales``: mistral.rs's linear layout) and, with `fused_experts` = the (gate, up,
    down) expert names, every MoE block's experts stacked as GPT-OSS stores them
    (``<moe>.experts.gate_up_proj_blocks`` [E, 2I, H / 32, 16], gate rows then up rows, and
    ``down_proj_blocks``, with their ``_scales``). Returns (dst, {weight name: transformers'
    ``convert_moe_packed_tensors`` of the packed tensors, float32}: the reference dequantizer)."""
    import re

    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    def reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """transformers' dequantizer takes [E, rows, G, 16] and returns [E, in, rows]."""
        b, s = torch.from_numpy(blocks), torch.from_numpy(scales)
        squeeze = b.dim() == 3
        if squeeze:
            b, s = b[None], s[None]
        w = convert_moe_packed_tensors(b, s, dtype=torch.float32).transpose(1, 2).contiguous().numpy()
        return w[0] if squeeze else w

    tensors = _copy_source(src, dst, "np")
    out, dequantized = {}, {}
    experts: dict[str, dict[tuple[int, str], np.ndarray]] = {}
    pattern = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<kind>\w+)\.weight$")
    for name, t in tensors.items():
        m = pattern.match(name) if fused_experts else None
        if m is not None:
            experts.setdefault(m["prefix"], {})[(int(m["e"]), m["kind"])] = t.astype(np.float32)
            continue
        if not quantized(name) or t.ndim != 2 or t.shape[1] % 32:
            out[name] = t
            continue
        layer = name.removesuffix(".weight")
        blocks, scales = pack_mxfp4(t)
        dequantized[name] = reference(blocks, scales)
        out[f"{layer}.blocks"], out[f"{layer}.scales"] = blocks.reshape(t.shape[0], -1), scales
    for prefix, per in experts.items():
        assert fused_experts is not None
        gate, up, down = fused_experts
        count = 1 + max(e for e, _ in per)
        gate_up = np.stack([np.concatenate([per[(e, gate)], per[(e, up)]]) for e in range(count)])
        downs = np.stack([per[(e, down)] for e in range(count)])
        for kind, w in (("gate_up_proj", gate_up), ("down_proj", downs)):
            blocks, scales = pack_mxfp4(w)
            out[f"{prefix}.{kind}_blocks"], out[f"{prefix}.{kind}_scales"] = blocks, scales
            deq = reference(blocks, scales)
            half = w.shape[1] // 2
            for e in range(count):
                if kind == "down_proj":
                    dequantized[f"{prefix}.{e}.{down}.weight"] = deq[e]
                else:
                    dequantized[f"{prefix}.{e}.{gate}.weight"] = deq[e, :half]
                    dequantized[f"{prefix}.{e}.{up}.weight"] = deq[e, half:]
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, dequantized
