"""GGUF ``deepseek2`` files (DeepSeek V2, V2-Lite, V3, R1) back into the HF checkpoint.

What llama.cpp's ``DeepseekV2Model`` converter rewrote, undone here:

- MLA as MQA: ``head_count_kv`` 1, ``key_length``/``value_length`` the latent sizes; the per-head
  sizes are ``key_length_mla`` / ``value_length_mla`` (files before them: ``key_length`` and
  ``value_length`` are the per-head sizes and ``kv_b_proj`` is whole, ``attn_kv_b``).
- ``kv_b_proj`` split per head into ``attn_k_b`` ``[H, rank, nope]`` (transposed) and ``attn_v_b``
  ``[H, v, rank]``: joined back as floats (a transposed quantized tensor cannot be re-blocked; the
  model dequantizes this projection for its absorbed matmuls anyway).
- V3 is told from V2 by its sigmoid gating (``expert_gating_func`` 2) or its correction bias
  (``exp_probs_b``); groups, scaling and renormalisation come from the ``expert_*`` keys.
- Yarn's ``mscale_all_dim`` is stored as ``rope.scaling.yarn_log_multiplier`` (x 0.1); ``mscale`` is not
  stored: llama.cpp's graph runs with ``mscale == mscale_all_dim`` (the published checkpoints' values),
  and so does the converted config. Its rope always rotates pairs (``rope_interleave`` true).
- GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``) is written as ``deepseek2`` too (`is_glm4_moe_lite` tells
  it apart); it runs as ``glm4moelite`` with HF's sigmoid router, its ``mlp_layer_types`` from the
  leading dense count. Its multi-token-prediction layer is counted in ``block_count`` and left out.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import (
    CONSUMED_TENSORS,
    GgufConversion,
    Hparams,
    TensorPart,
    map_tensors,
    standard_config,
    trunk_layers,
)

BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",  # joined with attn_v_b below
    "attn_v_b": "self_attn.v_b_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "exp_probs_b": "mlp.gate.e_score_correction",  # .bias -> e_score_correction_bias below
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


def join_kv_b(nope: int, v: int) -> Any:
    """``kv_b_proj`` [H * (nope + v), rank] from ``attn_k_b`` [H, rank, nope] and ``attn_v_b`` [H, v, rank]."""

    def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
        k_b, v_b = tensors
        heads, rank = k_b.shape[0], k_b.shape[1]
        if tuple(k_b.shape) != (heads, rank, nope) or tuple(v_b.shape) != (heads, v, rank):
            raise ModelLoadError(f"attn_k_b {tuple(k_b.shape)} and attn_v_b {tuple(v_b.shape)} do not fit "
                                 f"{nope} + {v} dims per head; the GGUF file is inconsistent")
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(heads * (nope + v), rank).contiguous()

    return combine


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture="DeepseekV2ForCausalLM", model_type="deepseek_v2", hp=hp)
    n_head = config["num_attention_heads"]
    config["num_key_value_heads"] = n_head  # the converter wrote MQA's 1
    config.pop("head_dim", None)  # key_length is the latent's
    rope_dim = int(hp.require("rope.dimension_count"))
    if hp.has("attention.key_length_mla"):
        qk_head, v_head = int(hp.require("attention.key_length_mla")), int(hp.require("attention.value_length_mla"))
    elif "blk.0.attn_k_b.weight" in gguf.tensors and "blk.0.attn_kv_b.weight" not in gguf.tensors:
        raise ModelLoadError(f"{hp.where}: metadata 'deepseek2.attention.key_length_mla' is missing beside a split "
                             "kv_b_proj (attn_k_b, attn_v_b); the GGUF file is incomplete")
    else:
        qk_head, v_head = int(hp.require("attention.key_length")), int(hp.require("attention.value_length"))
    q_lora = hp.get("attention.q_lora_rank")
    gating = _GATING.get(int(hp.get("expert_gating_func", 1)))
    if gating is None:
        raise ModelLoadError(f"{hp.where}: metadata 'deepseek2.expert_gating_func' is {hp.get('expert_gating_func')}; "
                             "only softmax (1) and sigmoid (2) DeepSeek routers are supported")
    v3 = gating == "sigmoid" or any(t.endswith(".exp_probs_b.bias") for t in gguf.tensors)
    n_group = int(hp.get("expert_group_count", 1) or 1)
    config.update({
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(hp.require("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": qk_head - rope_dim,
        "v_head_dim": v_head,
        "first_k_dense_replace": int(hp.get("leading_dense_block_count", 0)),
        "moe_intermediate_size": int(hp.require("expert_feed_forward_length")),
        "n_shared_experts": int(hp.get("expert_shared_count", 0)),
        "routed_scaling_factor": float(hp.get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(hp.get("expert_weights_norm", False)),
        "n_group": n_group,
        "topk_group": int(hp.get("expert_group_used_count", 1) or 1),
        "scoring_func": gating,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "rope_interleave": True,
    })
    if hp.has("expert_count"):
        config["n_routed_experts"] = int(hp.require("expert_count"))
        config["num_experts_per_tok"] = int(hp.require("expert_used_count"))
    if v3:
        config.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    rope = config.get("rope_scaling")
    if rope is not None and rope.get("rope_type") == "yarn" and hp.get("rope.scaling.yarn_log_multiplier") is not None:
        mscale = float(hp.get("rope.scaling.yarn_log_multiplier")) / 0.1
        rope.update(mscale=mscale, mscale_all_dim=mscale)
    if rope is not None:
        rope.setdefault("rope_theta", config["rope_theta"])
    layers, mtp = trunk_layers(gguf, hp)
    config["num_hidden_layers"] = layers
    if is_glm4_moe_lite(gguf, hp):
        dense = config["first_k_dense_replace"]
        config.update(architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite", scoring_func="sigmoid",
                      topk_method="noaux_tc", mlp_layer_types=["dense"] * dense + ["sparse"] * (layers - dense))
    parts = map_tensors(gguf, block_names=BLOCK_NAMES, skip=CONSUMED_TENSORS + mtp)
    return GgufConversion(config=config, parts=_join_parts(parts, config["qk_nope_head_dim"], v_head, hp.where))


def is_glm4_moe_lite(gguf: Any, hp: Hparams) -> bool:
    """A ``deepseek2`` file converted from GLM-4.7-Flash: GLM's tokenizer (``glm4`` pre-tokenizer,
    ``[gMASK]`` as BOS), the multi-token-prediction layer only its converter writes for this
    architecture, or the shape llama.cpp itself tells it by (47/48 layers, 154880 tokens)."""
    meta = gguf.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.pre") == "glm4" or hp.has("nextn_predict_layers"):
        return True
    if tokens is not None and bos is not None and 0 <= int(bos) < len(tokens) and tokens[int(bos)] == "[gMASK]":
        return True
    embd = gguf.tensors.get("token_embd.weight")
    return int(hp.require("block_count")) in (47, 48) and embd is not None and int(embd.shape[0]) == 154880


def _join_parts(parts: list[TensorPart], nope: int, v: int, where: str) -> list[TensorPart]:
    out: list[TensorPart] = []
    v_b = {p.hf_name: p for p in parts if ".self_attn.v_b_proj." in p.hf_name}
    # files of llama.cpp's first split (spring 2025) hold attn_kv_b beside attn_k_b/attn_v_b: kept as
    # it is (its blocks are rows of kv_b_proj already), the halves ignored
    whole = {p.hf_name for p in parts if ".self_attn.kv_b_proj." in p.hf_name}
    for part in parts:
        name = part.hf_name
        if ".self_attn.v_b_proj." in name:
            continue
        if ".self_attn.k_b_proj." in name and name.replace(".k_b_proj.", ".kv_b_proj.") in whole:
            v_b.pop(name.replace(".k_b_proj.", ".v_b_proj."), None)
            continue
        if ".self_attn.k_b_proj." in name:
            partner = v_b.pop(name.replace(".k_b_proj.", ".v_b_proj."), None)
            if partner is None:
                raise ModelLoadError(f"{where}: tensor {part.gguf_name!r} has no attn_v_b beside it; the GGUF file is incomplete")
            out.append(TensorPart(name.replace(".k_b_proj.", ".kv_b_proj."), part.gguf_name,
                                  also=(partner.gguf_name,), combine=join_kv_b(nope, v)))
            continue
        if name.endswith(".e_score_correction.bias"):
            part = attrs.evolve(part, hf_name=name.removesuffix(".e_score_correction.bias") + ".e_score_correction_bias")
        out.append(part)
    if v_b:
        raise ModelLoadError(f"{where}: tensor {next(iter(v_b.values())).gguf_name!r} has no attn_k_b beside it; "
                             "the GGUF file is incomplete")
    return out
