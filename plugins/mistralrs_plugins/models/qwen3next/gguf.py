"""GGUF ``qwen3next`` files (Qwen3-Next) back into the HF checkpoint.

What llama.cpp's ``Qwen3NextModel`` converter rewrote, undone here:

- Every RMSNorm but the DeltaNet's gated one stored as 1 + w (back to w: the model scales by
  1 + w itself).
- ``in_proj_qkvz`` (rows per key-head group: q, k, the group's v heads, their z) regrouped into
  ``attn_qkv`` (all q, all k, all v) and ``attn_gate`` (all z): joined back in HF's order, by
  whole rows (block rows as they are in a quantized file: `JoinRows`).
- ``A_log`` stored as A = -exp(A_log) (``ssm_a``, no suffix), ``dt_bias`` as ``ssm_dt.bias``,
  the conv weight squeezed to [C, K].
- Which layers are linear attention: ``attention.recurrent_layers`` (one flag per layer), else
  ``full_attention_interval``. Sizes: ``ssm.group_count`` key heads, ``ssm.time_step_rank`` value
  heads, ``ssm.state_size`` the key head width, ``ssm.inner_size`` all value heads' width,
  ``ssm.conv_kernel``; the partial rotary is ``rope.dimension_count``.
- The multi-token-prediction layer counted in ``block_count`` (``nextn_predict_layers``) is left out.

llama.cpp's graph routes every layer through the MoE with its top-k weights renormalised, and so
does the converted config (``mlp_only_layers`` / ``decoder_sparse_step`` / ``norm_topk_prob``
are not stored).
"""

from __future__ import annotations

from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import (
    CONSUMED_TENSORS,
    STANDARD_BLOCK_NAMES,
    GgufConversion,
    Hparams,
    JoinRows,
    TensorPart,
    Transform,
    add_value,
    map_tensors,
    neg_exp_to_log,
    partial_rotary_factor,
    reshape_to,
    standard_config,
    trunk_layers,
)

BLOCK_NAMES = {
    **STANDARD_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",  # joined with attn_gate below
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_ba": "linear_attn.in_proj_ba",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_dt": "linear_attn.dt",  # .bias -> dt_bias below
    "ssm_a": "linear_attn.A_log",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}


def qkvz_order(nk: int, dk: int, per_group_v: int) -> tuple[int, ...]:
    """Rows of [attn_qkv; attn_gate] (q heads, k heads, v heads, z heads) in HF's per-group order."""
    k0, v0 = nk * dk, 2 * nk * dk
    z0 = v0 + nk * per_group_v
    order: list[int] = []
    for g in range(nk):
        order += range(g * dk, (g + 1) * dk)
        order += range(k0 + g * dk, k0 + (g + 1) * dk)
        order += range(v0 + g * per_group_v, v0 + (g + 1) * per_group_v)
        order += range(z0 + g * per_group_v, z0 + (g + 1) * per_group_v)
    return tuple(order)


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture="Qwen3NextForCausalLM", model_type="qwen3_next", hp=hp)
    layers, mtp = trunk_layers(gguf, hp)
    nk, nv = int(hp.require("ssm.group_count")), int(hp.require("ssm.time_step_rank"))
    dk, value_dim = int(hp.require("ssm.state_size")), int(hp.require("ssm.inner_size"))
    if nv % nk or value_dim % nv:
        raise ModelLoadError(f"{hp.where}: ssm.group_count {nk} / ssm.time_step_rank {nv} / ssm.inner_size {value_dim} "
                             "do not fit Qwen-Next's linear attention; the GGUF file is inconsistent")
    dv = value_dim // nv
    recurrent = hp.get("attention.recurrent_layers")
    if isinstance(recurrent, list):
        linear = [bool(r) for r in recurrent[:layers]]
    else:
        interval = int(hp.get("full_attention_interval", 4))
        linear = [(i + 1) % interval != 0 for i in range(layers)]
    hidden = config["hidden_size"]
    head_dim = int(config.get("head_dim") or hidden // config["num_attention_heads"])
    config.update({
        "num_hidden_layers": layers,
        "head_dim": head_dim,
        "layer_types": ["linear_attention" if r else "full_attention" for r in linear],
        "linear_num_key_heads": nk,
        "linear_num_value_heads": nv,
        "linear_key_head_dim": dk,
        "linear_value_head_dim": dv,
        "linear_conv_kernel_dim": int(hp.require("ssm.conv_kernel")),
        "num_experts": int(hp.require("expert_count")),
        "num_experts_per_tok": int(hp.require("expert_used_count")),
        "moe_intermediate_size": int(hp.require("expert_feed_forward_length")),
        "shared_expert_intermediate_size": int(hp.require("expert_shared_feed_forward_length")),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    })
    prf = partial_rotary_factor(hp, head_dim)
    if prf is not None:
        config["partial_rotary_factor"] = prf

    def transforms(hf_name: str, info: Any) -> Transform | None:
        if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
            return add_value(-1.0)
        if hf_name.endswith(".A_log"):
            return neg_exp_to_log
        if hf_name.endswith(".conv1d.weight"):
            channels, kernel = info.shape
            return reshape_to(channels, 1, kernel)
        if hf_name.endswith(".shared_expert_gate.weight"):
            return reshape_to(1, hidden)
        return None

    parts = map_tensors(gguf, block_names=BLOCK_NAMES, transforms=transforms, skip=CONSUMED_TENSORS + mtp)
    return GgufConversion(config=config, parts=_join(parts, qkvz_order(nk, dk, nv // nk * dv), hp.where))


def _join(parts: list[TensorPart], order: tuple[int, ...], where: str) -> list[TensorPart]:
    """``in_proj_qkv`` + ``in_proj_z`` -> ``in_proj_qkvz`` (HF's row order); ``dt.bias`` -> ``dt_bias``."""
    gates = {p.hf_name: p for p in parts if ".linear_attn.in_proj_z." in p.hf_name}
    out = []
    for part in parts:
        name = part.hf_name
        if ".linear_attn.in_proj_z." in name:
            continue
        if ".linear_attn.in_proj_qkv." in name:
            gate = gates.pop(name.replace(".in_proj_qkv.", ".in_proj_z."), None)
            if gate is None:
                raise ModelLoadError(f"{where}: tensor {part.gguf_name!r} has no attn_gate beside it; the GGUF file "
                                     "is incomplete (files with a fused ssm_in are not supported)")
            out.append(TensorPart(name.replace(".in_proj_qkv.", ".in_proj_qkvz."), part.gguf_name,
                                  also=(gate.gguf_name,), combine=JoinRows(order)))
            continue
        if name.endswith(".linear_attn.dt.bias"):
            part = TensorPart(name.removesuffix(".dt.bias") + ".dt_bias", part.gguf_name, part.transform)
        out.append(part)
    if gates:
        raise ModelLoadError(f"{where}: tensor {next(iter(gates.values())).gguf_name!r} has no attn_qkv beside it; "
                             "the GGUF file is incomplete")
    return out
