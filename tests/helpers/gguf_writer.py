"""GGUF files of the tiny test checkpoints, written the way llama.cpp's converter writes them.

CI has no llama.cpp, so this follows ``convert_hf_to_gguf.py`` (the vendored copy in the
``llama-cpp-python`` sdist: ``conversion/base.py`` and the per-family modules) with the `gguf`
package's writer, and takes the tensor names from gguf's own `TensorNameMap` — an oracle
independent of mistralrs's mapping. Per family a `Recipe` holds what the converter does
differently (hyper-parameters, Q/K permutation, norm offsets, expert stacking).

When ``LLAMA_CPP_SRC`` points at a llama.cpp source tree, `convert_with_llama_cpp` runs the
real converter instead (tests compare the two).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

Modify = Callable[[str, torch.Tensor, dict], list[tuple[str, torch.Tensor]]]


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    # LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        t = _permute(t, n_head, n_head)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        t = _permute(t, n_head, n_kv)
    return [(name, t)]


def plain_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    return [(name, t)]


def base_hparams(w: Any, cfg: dict) -> None:
    """TextModel.set_gguf_parameters (the common part)."""
    w.add_block_count(cfg["num_hidden_layers"])
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    if cfg.get("intermediate_size") is not None:
        w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    if cfg.get("num_key_value_heads") is not None:
        w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(theta)
    if cfg.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("layer_norm_eps") is not None:
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        w.add_expert_count(cfg.get("num_local_experts") or cfg.get("num_experts"))
    if cfg.get("num_experts_per_tok"):
        w.add_expert_used_count(cfg["num_experts_per_tok"])


def llama_hparams(w: Any, cfg: dict) -> None:
    base_hparams(w, cfg)
    w.add_vocab_size(cfg["vocab_size"])
    rope_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(rope_dim)


def qwen3moe_hparams(w: Any, cfg: dict) -> None:
    base_hparams(w, cfg)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def llama_extra(cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """LlamaModel.generate_extra_tensors: llama3 rope scaling as the rope_freqs tensor."""
    import math

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or "").lower() != "llama3":
        return []
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32))]


@attrs.frozen
class Recipe:
    arch: str  # gguf.MODEL_ARCH member name
    hparams: Callable[[Any, dict], None] = base_hparams
    modify: Modify = plain_modify
    # name -> "F32" forced (the converter keeps these in F32 whatever the outtype)
    f32: tuple[str, ...] = ()
    # generate_extra_tensors: (GGUF name, tensor), always F32
    extra: Callable[[dict], list[tuple[str, torch.Tensor]]] = lambda cfg: []


RECIPES: dict[str, Recipe] = {
    "LlamaForCausalLM": Recipe("LLAMA", llama_hparams, llama_modify, extra=llama_extra),
    "MistralForCausalLM": Recipe("LLAMA", llama_hparams, llama_modify, extra=llama_extra),
    "MixtralForCausalLM": Recipe("LLAMA", llama_hparams, llama_modify, f32=("ffn_gate_inp",), extra=llama_extra),
    "Qwen2ForCausalLM": Recipe("QWEN2"),
    "Qwen3ForCausalLM": Recipe("QWEN3"),
    "Qwen3MoeForCausalLM": Recipe("QWEN3MOE", qwen3moe_hparams, f32=("ffn_gate_inp",)),
}

_EXPERT_RE = re.compile(r"^(?P<pre>.*)\.experts\.(?P<e>\d+)\.(?P<w>\w+)\.weight$")


def _tokenizer_metadata(w: Any, hf_dir: Path, vocab_size: int) -> None:
    """_set_vocab_gpt2: tokens by id with their types, merges and special ids (gguf.SpecialVocab)."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    reverse = {i: t for t, i in tok.vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            looks_special = token.startswith(("<|", "<", "[")) and token.endswith(("|>", ">", "]"))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w)


def write_gguf(hf_dir: Path | str, out: Path | str, *, outtype: str = "f32") -> Path:
    """Convert the checkpoint in `hf_dir` to GGUF `out` (outtype f32, f16, bf16 or q8_0)."""
    import gguf
    from safetensors.torch import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    recipe = RECIPES[cfg["architectures"][0]]
    arch = getattr(gguf.MODEL_ARCH, recipe.arch)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(hf_dir.name)
    recipe.hparams(w, cfg)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if (hf_dir / "tokenizer.json").is_file():  # parity checkpoints have none: weights only
        _tokenizer_metadata(w, hf_dir, cfg["vocab_size"])

    names = gguf.TensorNameMap(arch, cfg["num_hidden_layers"])
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    # stack per-expert weights into one [experts, out, in] tensor, as the converter does
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    plain: list[tuple[str, torch.Tensor]] = []
    for name, t in list(tensors.items()):
        # transformers' fused expert layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            del tensors[name]
            tensors[name.replace("gate_up_proj", "gate_proj.weight")] = gate
            tensors[name.replace("gate_up_proj", "up_proj.weight")] = up
        elif name.endswith("experts.down_proj"):
            tensors[name + ".weight"] = tensors.pop(name)
    for name, t in tensors.items():
        m = _EXPERT_RE.match(name)
        if m:
            stacked.setdefault(f"{m['pre']}.experts.{m['w']}.weight", {})[int(m["e"])] = t
        else:
            plain.append((name, t))
    for name, experts in stacked.items():
        plain.append((name, torch.stack([experts[e] for e in sorted(experts)])))

    for name, t in recipe.extra(cfg):
        w.add_tensor(name, t.numpy())
    for name, t in plain:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        t = t.float() if t.dtype not in (torch.float16, torch.float32) else t
        for hf_name, data in recipe.modify(name, t, cfg):
            new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ValueError(f"gguf's TensorNameMap has no name for {hf_name!r}")
            arr = data.float().numpy()
            n_dims = arr.ndim
            keep_f32 = n_dims <= 1 or new.endswith("_norm.weight") or any(k in new for k in recipe.f32)
            if outtype == "f32" or keep_f32:
                w.add_tensor(new, arr.astype(np.float32))
            elif outtype == "f16":
                w.add_tensor(new, arr.astype(np.float16))
            elif outtype == "bf16":
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)
                w.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                try:
                    q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                    w.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                except gguf.QuantError:
                    w.add_tensor(new, arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_cpp_src() -> Path | None:
    src = os.environ.get("LLAMA_CPP_SRC")
    return Path(src) if src and (Path(src) / "convert_hf_to_gguf.py").is_file() else None


_RUNNER = """
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src + "/gguf-py"); sys.path.insert(0, src)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tok: "qwen2"  # the tiny tokenizers are not in its hash table
def _no_spm(self, *a, **k):
    raise FileNotFoundError("no sentencepiece model")
base.TextModel._set_vocab_sentencepiece = _no_spm
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert_with_llama_cpp(hf_dir: Path | str, out: Path | str, *, outtype: str = "f32") -> Path:
    """Run llama.cpp's own converter (``LLAMA_CPP_SRC``) on `hf_dir`."""
    src = llama_cpp_src()
    assert src is not None, "LLAMA_CPP_SRC is not set"
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(src), str(hf_dir), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
    return Path(out)
