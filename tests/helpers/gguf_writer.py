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


def _find(cfg: dict, keys: tuple[str, ...]) -> Any:
    """ModelBase.find_hparam(keys, optional=True): the first key present (its value may be None)."""
    return next((cfg[k] for k in keys if k in cfg), None)


def rope_parameters(cfg: dict) -> dict:
    """TextModel.__init__'s ``self.rope_parameters``: rope_parameters (or rope_scaling), with the
    top-level theta / local theta / partial rotary factor / original context mirrored in."""
    rope = dict(cfg.get("rope_parameters", cfg.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        theta = _find(cfg, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                            "rotary_emb_base"))
        local = _find(cfg, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                            "rope_local_base_freq"))
        prf = _find(cfg, ("partial_rotary_factor", "rope_pct", "rope_percent"))
        orig = _find(cfg, ("original_max_position_embeddings",))
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "partial_rotary_factor" not in rope and prf is not None:
            rope["partial_rotary_factor"] = prf
        if "original_max_position_embeddings" not in rope and orig is not None:
            rope["original_max_position_embeddings"] = orig
    return rope


def base_hparams(w: Any, cfg: dict) -> None:
    """TextModel.set_gguf_parameters (the parts these checkpoints reach)."""
    import gguf

    w.add_block_count(cfg["num_hidden_layers"])
    if (n_ctx := _find(cfg, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                             "max_sequence_length", "model_max_length"))) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _find(cfg, ("hidden_size", "n_embd", "dim"))) is not None:
        w.add_embedding_length(n_embd)
    if (n_ff := _find(cfg, ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                            "n_inner", "hidden_dim"))) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _find(cfg, ("num_attention_heads", "n_head", "n_heads"))) is not None:
        w.add_head_count(n_head)
    if (n_kv := _find(cfg, ("num_key_value_heads", "n_kv_heads"))) is not None:
        w.add_head_count_kv(n_kv)
    rope_all = rope_parameters(cfg)
    rope = rope_all.get("full_attention", rope_all)
    if (rope_type := rope.get("rope_type")) is not None:
        factor = rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if (v := rope.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(v)
            if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(v)
            if (v := rope.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(v)
            if (v := rope.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(v)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := rope_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    if (eps := _find(cfg, ("rms_norm_eps", "norm_eps"))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(cfg, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    if (n_experts := _find(cfg, ("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        w.add_expert_count(n_experts)
    if (n_used := _find(cfg, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        w.add_expert_used_count(n_used)
    if (n_group := cfg.get("n_group")) is not None:
        w.add_expert_group_count(n_group)
    if (n_group_used := cfg.get("topk_group")) is not None:
        w.add_expert_group_used_count(n_group_used)
    score = _find(cfg, ("score_function", "scoring_func", "score_func", "moe_router_activation",
                        "moe_router_activation_func", "expert_selection_fn"))
    if score is not None:
        w.add_expert_gating_func({"sigmoid": gguf.ExpertGatingFuncType.SIGMOID,
                                  "softmax": gguf.ExpertGatingFuncType.SOFTMAX}[score])
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def llama_hparams(w: Any, cfg: dict) -> None:
    base_hparams(w, cfg)
    w.add_vocab_size(cfg["vocab_size"])
    rope_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(rope_dim)


def qwen3moe_hparams(w: Any, cfg: dict) -> None:
    base_hparams(w, cfg)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def phi2_hparams(w: Any, cfg: dict) -> None:
    """Phi2Model.set_gguf_parameters: feed_forward_length 4 * hidden, head_count_kv = head_count
    (whatever the checkpoint says), no rope theta, the partial rotary as rotated dims per head."""
    rot_pct = rope_parameters(cfg)["partial_rotary_factor"]
    n_embd, n_head = _find(cfg, ("hidden_size", "n_embd")), _find(cfg, ("num_attention_heads", "n_head"))
    w.add_context_length(_find(cfg, ("n_positions", "max_position_embeddings")))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(4 * n_embd)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(_find(cfg, ("layer_norm_epsilon", "layer_norm_eps")))
    w.add_rope_dimension_count(int(rot_pct * n_embd) // n_head)
    w.add_add_bos_token(False)


def _phi3_rope(cfg: dict) -> tuple[dict, int, int]:
    rope = rope_parameters(cfg)
    n_embd, n_head = _find(cfg, ("hidden_size", "n_embd")), _find(cfg, ("num_attention_heads", "n_head"))
    return rope, n_embd, int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head


def phi3_hparams(w: Any, cfg: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters (+ the attn_factor its generate_extra_tensors writes)."""
    import math

    rope, n_embd, rope_dims = _phi3_rope(cfg)
    max_pos = _find(cfg, ("n_positions", "max_position_embeddings"))
    orig = rope["original_max_position_embeddings"]
    w.add_context_length(max_pos)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(_find(cfg, ("num_key_value_heads", "n_head_kv")))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_sliding_window(cfg.get("sliding_window") or 0)
    if rope.get("long_factor"):
        scale = max_pos / orig
        kind = rope.get("rope_type", "").lower()
        if kind in ("su", "longrope"):
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        else:  # yarn
            attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(attn_factor)


def phimoe_hparams(w: Any, cfg: dict) -> None:
    """PhiMoeModel.set_gguf_parameters: Phi-3's plus the expert counts."""
    phi3_hparams(w, cfg)
    w.add_expert_used_count(_find(cfg, ("num_experts_per_tok", "num_experts_per_token")))
    w.add_expert_count(_find(cfg, ("num_local_experts", "num_experts")))


def phi3_extra(cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """Phi3MiniModel.generate_extra_tensors: longrope's factors as two tensors."""
    rope, _, rope_dims = _phi3_rope(cfg)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return []
    assert len(long) == len(short) == rope_dims // 2
    return [("rope_factors_long.weight", torch.tensor(long, dtype=torch.float32)),
            ("rope_factors_short.weight", torch.tensor(short, dtype=torch.float32))]


def gemma_hparams(w: Any, cfg: dict) -> None:
    """GemmaModel.set_gguf_parameters (no TextModel part: no rope theta or scaling)."""
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])


def gemma2_hparams(w: Any, cfg: dict) -> None:
    """Gemma2Model.set_gguf_parameters: Gemma's plus the softcaps and the window."""
    gemma_hparams(w, cfg)
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])


def gemma3_hparams(w: Any, cfg: dict) -> None:
    """Gemma3Model.set_gguf_parameters: TextModel's, then its own defaults and overrides."""
    base_hparams(w, cfg)
    rope = rope_parameters(cfg)
    w.add_context_length(cfg.get("max_position_embeddings", 131072))
    w.add_head_count(cfg.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_key_length(cfg.get("head_dim", 256))
    w.add_value_length(cfg.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    assert cfg.get("attn_logit_softcapping") is None, "the converter refuses Gemma 3 with an attention softcap"
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("sliding_window_pattern") != 1:
        w.add_sliding_window(cfg["sliding_window"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", 4))


def gemma_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """Gemma/Gemma2Model: lm_head.weight skipped (the graph reuses the embeddings), norms + 1."""
    if name == "lm_head.weight":
        return []
    return gemma3_modify(name, t, cfg)


def gemma3_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """Gemma3Model.modify_tensors: every ``*norm.weight`` (QK-norms too) stored as 1 + w. (Its
    cut of out-of-vocabulary embedding rows needs a tokenizer; the test checkpoints have none.)"""
    if name.endswith("norm.weight"):
        t = t + 1
    return [(name, t)]


def glm4_hparams(w: Any, cfg: dict) -> None:
    """Glm4Model.set_gguf_parameters: TextModel's plus the rotated dims (partial rotary)."""
    base_hparams(w, cfg)
    rope_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(int(rope_dim * rope_parameters(cfg).get("partial_rotary_factor", 0.5)))


def granite_hparams(w: Any, cfg: dict) -> None:
    """GraniteModel.set_gguf_parameters: LlamaModel's without head_dim, plus the multipliers."""
    cfg = {k: v for k, v in cfg.items() if k != "head_dim"}
    llama_hparams(w, cfg)
    if cfg.get("attention_multiplier"):
        w.add_attention_scale(cfg["attention_multiplier"])
    if cfg.get("embedding_multiplier"):
        w.add_embedding_scale(cfg["embedding_multiplier"])
    if cfg.get("residual_multiplier"):
        w.add_residual_scale(cfg["residual_multiplier"])
    if cfg.get("logits_scaling"):
        w.add_logit_scale(cfg["logits_scaling"])


def _granite_attn_layers(cfg: dict) -> list[int]:
    """GraniteHybridModel.get_attn_layers: layer_types entries "attention" (the Hub's names;
    transformers 5 saves "full_attention", which this converter does not know), else the
    index list or period."""
    if layer_types := cfg.get("layer_types"):
        return [i for i, t in enumerate(layer_types) if t == "attention"]
    if attn := cfg.get("attn_layer_indices", []):
        return attn
    return [i for i in range(cfg["num_hidden_layers"]) if i % cfg["attn_layer_period"] == cfg["attn_layer_offset"]]


def granitehybrid_hparams(w: Any, cfg: dict) -> None:
    """GraniteHybridModel.set_gguf_parameters: GraniteMoeModel's, the Mamba-2 sizes, the KV head
    count per layer (0: Mamba), rope only for Bamba or a model without Mamba layers."""
    granite_hparams(w, cfg)
    if shared := cfg.get("shared_intermediate_size"):
        w.add_expert_shared_feed_forward_length(shared)
    attn = _granite_attn_layers(cfg)
    ssm = [i for i in range(cfg["num_hidden_layers"]) if i not in attn]
    w.add_ssm_conv_kernel(cfg["mamba_d_conv"])
    w.add_ssm_state_size(cfg["mamba_d_state"])
    w.add_ssm_group_count(cfg["mamba_n_groups"])
    w.add_ssm_inner_size(cfg["mamba_expand"] * cfg["hidden_size"])
    w.add_ssm_time_step_rank(cfg["mamba_n_heads"])
    w.add_head_count_kv([cfg["num_key_value_heads"] if i in attn else 0 for i in range(cfg["num_hidden_layers"])])
    if rope_dim := cfg.get("attn_rotary_emb"):
        w.add_rope_dimension_count(rope_dim)
    use_rope = "BambaForCausalLM" in cfg["architectures"] or not ssm
    w.add_rope_scaling_finetuned(use_rope)
    if not use_rope:
        w.add_context_length(2**20)


def granitehybrid_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """GraniteHybridModel.modify_tensors: experts' and the shared MLP's fused input_linear split
    into gate / up, Mamba-2's tensors as Mamba2Model writes them (conv1d squeezed, A = -exp(A_log)
    and D as [H, 1], the norm as [groups, d_inner / groups], dt_bias as dt_proj.bias), attention
    Q/K permuted as Llama's."""
    pre = name.rsplit(".", 2)[0] if name.endswith(".weight") else name.rsplit(".", 1)[0]
    if name.endswith("block_sparse_moe.input_linear.weight"):
        gate, up = t.split(cfg["intermediate_size"], dim=-2)
        return [(pre + ".experts.w1.weight", gate), (pre + ".experts.w3.weight", up)]
    layer = pre.rsplit(".", 1)[0]
    experts = bool(cfg.get("num_local_experts"))
    if name.endswith("shared_mlp.input_linear.weight"):
        gate, up = t.split(cfg["shared_intermediate_size"], dim=-2)
        mlp = layer + (".mlp.shared_expert" if experts else ".mlp")
        return [(mlp + ".gate_proj.weight", gate), (mlp + ".up_proj.weight", up)]
    if name.endswith("shared_mlp.output_linear.weight") and not experts:
        return [(layer + ".mlp.down_proj.weight", t)]
    if ".mamba." in name:
        if name.endswith(".dt_bias"):
            return [(name.replace(".dt_bias", ".dt_proj.bias"), t)]
        if name.endswith("conv1d.weight"):
            return [(name, t.squeeze())]
        if name.endswith(".A_log"):
            return [(name, -torch.exp(t.reshape(*t.shape, 1)))]
        if name.endswith(".D"):
            return [(name, t.reshape(*t.shape, 1))]
        if name.endswith("norm.weight"):
            d_inner = cfg["mamba_expand"] * cfg["hidden_size"]
            return [(name, t.reshape(cfg["mamba_n_groups"], d_inner // cfg["mamba_n_groups"]))]
        return [(name, t)]
    return llama_modify(name, t, cfg)


def lfm2_hparams(w: Any, cfg: dict) -> None:
    """LFM2Model.set_gguf_parameters: KV heads per layer (0 for conv layers), the conv kernel,
    the feed-forward width as the model computes it."""
    kinds = cfg["layer_types"]
    base_hparams(w, {**cfg, "num_key_value_heads": [cfg["num_key_value_heads"] if t != "conv" else 0 for t in kinds]})
    w.add_vocab_size(cfg["vocab_size"])
    w.add_shortconv_l_cache(cfg["conv_L_cache"])
    w.add_layer_norm_rms_eps(cfg["norm_eps"])
    ff = _find(cfg, ("block_ff_dim", "intermediate_size"))
    if cfg["block_auto_adjust_ff_dim"]:
        ff = int(2 * ff / 3)
        if cfg["block_ffn_dim_multiplier"] is not None:
            ff = int(cfg["block_ffn_dim_multiplier"] * ff)
        ff = cfg["block_multiple_of"] * ((ff + cfg["block_multiple_of"] - 1) // cfg["block_multiple_of"])
    w.add_feed_forward_length(ff)


def lfm2_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """LFM2Model.modify_tensors: the conv weight squeezed to 2-D."""
    return [(name, t.squeeze(1) if "conv.conv" in name else t)]


def qwen3next_hparams(w: Any, cfg: dict) -> None:
    """Qwen3NextModel.set_gguf_parameters (with _QwenMtpMixin: block_count counts the
    multi-token-prediction layers, ``mtp_num_hidden_layers``; without it or mtp.* tensors the
    converter stops), Qwen2MoeModel's expert widths, the DeltaNet sizes, the layer pattern."""
    n_mtp = cfg.get("mtp_num_hidden_layers", 0)
    assert n_mtp, "llama.cpp's Qwen3-Next converter needs mtp_num_hidden_layers (or mtp.* tensors)"
    n = cfg["num_hidden_layers"]
    base_hparams(w, {**cfg, "num_hidden_layers": n + n_mtp})
    if cfg.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    if (layer_types := cfg.get("layer_types")) is not None:
        # add_recurrent_layers (newer gguf-py than the installed one)
        w.add_array(f"{w.arch}.attention.recurrent_layers", [t == "linear_attention" for t in layer_types] + [False] * n_mtp)
    w.add_full_attention_interval(cfg.get("full_attention_interval", 4))
    rope_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(int(rope_dim * rope_parameters(cfg).get("partial_rotary_factor", 0.25)))
    w.add_nextn_predict_layers(n_mtp)


def qwen3next_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """Qwen3NextModel.modify_tensors: A = -exp(A_log), dt_bias as dt_proj.bias, the conv weight
    squeezed, norms but the DeltaNet's as 1 + w, in_proj_qkvz regrouped into attn_qkv (all q,
    all k, all v) and attn_gate (all z)."""
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif "conv1d" in name:
        t = t.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if "in_proj_qkvz.weight" in name:
        dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
        nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        split = [dk, dk, nv // nk * dv, nv // nk * dv]
        q, k, v, z = torch.split(t.permute(1, 0).contiguous().view(-1, nk, sum(split)), split, dim=-1)
        hidden = cfg["hidden_size"]
        qkv = torch.cat([x.contiguous().view(hidden, -1) for x in (q, k, v)], dim=-1).permute(1, 0).contiguous()
        pre = name.removesuffix(".in_proj_qkvz.weight")
        return [(pre + ".in_proj_qkv.weight", qkv), (pre + ".in_proj_z.weight", z.contiguous().view(hidden, -1).T)]
    return [(name, t)]


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


def deepseek2_hparams(w: Any, cfg: dict) -> None:
    """DeepseekV2Model.set_gguf_parameters: MLA written as MQA (one KV head of the latent), the
    per-head sizes as the _mla lengths, the MoE keys, yarn's mscale_all_dim as log_mul."""
    cfg = {**cfg, "num_key_value_heads": 1, "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6)}
    base_hparams(w, cfg)
    has_moe = cfg.get("n_routed_experts") is not None
    dense = cfg.get("first_k_dense_replace")
    w.add_leading_dense_block_count(dense if dense is not None else (0 if has_moe else cfg["num_hidden_layers"]))
    rank = cfg.get("kv_lora_rank", 512)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + cfg["qk_rope_head_dim"])
    w.add_value_length(rank)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(_find(cfg, ("moe_intermediate_size", "intermediate_size")))
    if has_moe:
        w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
    if (mscale_all := rope_parameters(cfg).get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)


def glm4moe_hparams(w: Any, cfg: dict) -> None:
    """Glm4MoeModel.set_gguf_parameters: block_count counts the multi-token-prediction layers,
    the rotated dims, the MoE keys, a sigmoid router."""
    import gguf

    nextn = cfg.get("num_nextn_predict_layers")
    base_hparams(w, {**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + (nextn or 0)})
    rope_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(int(rope_dim * rope_parameters(cfg).get("partial_rotary_factor", 0.5)))
    if cfg.get("n_routed_experts") is not None:
        w.add_expert_count(cfg["n_routed_experts"])
    if cfg.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("n_shared_experts") is not None:
        w.add_expert_shared_count(cfg["n_shared_experts"])
    if cfg.get("first_k_dense_replace") is not None:
        w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob") is not None:
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    if nextn is not None:
        w.add_nextn_predict_layers(nextn)


def glm4moelite_hparams(w: Any, cfg: dict) -> None:
    """Glm4MoeLiteModel (a DeepseekV2Model): DeepSeek's keys; with multi-token-prediction
    layers, block_count counts them and nextn_predict_layers is written."""
    deepseek2_hparams(w, cfg)
    nextn = cfg.get("num_nextn_predict_layers", 0)
    if nextn != 0:
        w.add_block_count(cfg["num_hidden_layers"] + nextn)
        w.add_nextn_predict_layers(nextn)


def deepseek2_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """DeepseekV2Model.modify_tensors: tied head skipped, kv_b_proj split per head into k_b
    (transposed) and v_b; filter_tensors' ``e_score_correction.bias``."""
    if cfg.get("tie_word_embeddings", False) and name == "lm_head.weight":
        return []
    if name.endswith("e_score_correction_bias"):
        return [(name.replace("e_score_correction_bias", "e_score_correction.bias"), t)]
    if name.endswith("kv_b_proj.weight"):
        n_kv, v, nope = cfg["num_key_value_heads"], cfg["v_head_dim"], cfg["qk_nope_head_dim"]
        assert t.shape[0] == n_kv * (v + nope)
        k_b, v_b = t.view(n_kv, v + nope, t.shape[-1]).split([nope, v], dim=1)
        return [(name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)),
                (name.replace("kv_b_proj", "v_b_proj"), v_b)]
    return [(name, t)]


def gpt_oss_hparams(w: Any, cfg: dict) -> None:
    """GptOssModel.set_gguf_parameters: TextModel's, the window and the experts' width."""
    base_hparams(w, cfg)
    w.add_sliding_window(cfg["sliding_window"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])


def gpt_oss_modify(name: str, t: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """GptOssModel.filter_tensors / modify_tensors (float experts): ``sinks.weight``;
    ``gate_up_proj [E, H, 2I]`` transposed and split into even (gate) and odd (up) rows,
    ``down_proj`` transposed, the biases split alike."""
    if name.endswith("sinks"):
        return [(name + ".weight", t)]
    if name.endswith("experts.down_proj_bias"):
        return [(name.replace("down_proj_bias", "down_proj.bias"), t)]
    if name.endswith("experts.down_proj"):
        return [(name.replace("down_proj", "down_proj.weight"), t.transpose(-1, -2))]
    if name.endswith("experts.gate_up_proj_bias"):
        return [(name.replace("gate_up_proj_bias", "gate_proj.bias"), t[..., ::2]),
                (name.replace("gate_up_proj_bias", "up_proj.bias"), t[..., 1::2])]
    if name.endswith("experts.gate_up_proj"):
        t = t.transpose(-1, -2)
        return [(name.replace("gate_up_proj", "gate_proj.weight"), t[:, ::2, :]),
                (name.replace("gate_up_proj", "up_proj.weight"), t[:, 1::2, :])]
    return [(name, t)]


def _mxfp4_nibbles(t: torch.Tensor) -> torch.Tensor:
    """GptOssModel.transform_nibble_layout: GPT-OSS's bytes (element 2j low nibble, 2j+1 high)
    -> ggml's block_mxfp4 (byte j: element j low, element j + 16 high)."""
    lo, hi = t & 0x0F, t >> 4
    vals = torch.stack((lo, hi), dim=-1).reshape(*t.shape[:-1], 32)
    return vals[..., :16] | (vals[..., 16:] << 4)


def gpt_oss_mxfp4(cfg: dict, tensors: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray]]:
    """GptOssModel.generate_extra_tensors on an MXFP4 checkpoint: each expert weight as ggml MXFP4
    blocks (scale byte then 16 code bytes), gate_up's even rows the gate, odd ones the up."""
    if (cfg.get("quantization_config") or {}).get("quant_method") != "mxfp4":
        return []

    def repack(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
        data = torch.cat((scales.unsqueeze(-1), _mxfp4_nibbles(blocks)), dim=-1)
        return data.reshape(data.shape[0], data.shape[1], -1).numpy()

    out = []
    for name in sorted(tensors):
        if name.endswith("experts.down_proj_blocks"):
            out.append((name.replace("_blocks", ".weight"), repack(tensors[name], tensors[name[:-7] + "_scales"])))
        elif name.endswith("experts.gate_up_proj_blocks"):
            blocks, scales = tensors[name], tensors[name[:-7] + "_scales"]
            out.append((name.replace("gate_up_proj_blocks", "gate_proj.weight"), repack(blocks[:, ::2], scales[:, ::2])))
            out.append((name.replace("gate_up_proj_blocks", "up_proj.weight"), repack(blocks[:, 1::2], scales[:, 1::2])))
    return out


@attrs.frozen
class Recipe:
    arch: str  # gguf.MODEL_ARCH member name
    hparams: Callable[[Any, dict], None] = base_hparams
    modify: Modify = plain_modify
    # name -> "F32" forced (the converter keeps these in F32 whatever the outtype)
    f32: tuple[str, ...] = ()
    # generate_extra_tensors: (GGUF name, tensor), always F32
    extra: Callable[[dict], list[tuple[str, torch.Tensor]]] = lambda cfg: []
    # transformers' fused expert tensors split here (gate_up_proj [E, 2I, H] halves) before `modify`;
    # False: `modify` gets them as stored
    split_fused_experts: bool = True
    # (HF name, ggml MXFP4 bytes) made from pre-quantized checkpoint tensors (their *_blocks /
    # *_scales are then not written as such)
    mxfp4: Callable[[dict, dict[str, torch.Tensor]], list[tuple[str, np.ndarray]]] = lambda cfg, tensors: []


RECIPES: dict[str, Recipe] = {
    "LlamaForCausalLM": Recipe("LLAMA", llama_hparams, llama_modify, extra=llama_extra),
    "MistralForCausalLM": Recipe("LLAMA", llama_hparams, llama_modify, extra=llama_extra),
    "MixtralForCausalLM": Recipe("LLAMA", llama_hparams, llama_modify, f32=("ffn_gate_inp",), extra=llama_extra),
    "Qwen2ForCausalLM": Recipe("QWEN2"),
    "Qwen3ForCausalLM": Recipe("QWEN3"),
    "Qwen3MoeForCausalLM": Recipe("QWEN3MOE", qwen3moe_hparams, f32=("ffn_gate_inp",)),
    "PhiForCausalLM": Recipe("PHI2", phi2_hparams),
    "Phi3ForCausalLM": Recipe("PHI3", phi3_hparams, extra=phi3_extra),
    "PhimoeForCausalLM": Recipe("PHIMOE", phimoe_hparams, f32=("ffn_gate_inp",), extra=phi3_extra),
    "PhiMoEForCausalLM": Recipe("PHIMOE", phimoe_hparams, f32=("ffn_gate_inp",), extra=phi3_extra),
    "Starcoder2ForCausalLM": Recipe("STARCODER2"),
    "GemmaForCausalLM": Recipe("GEMMA", gemma_hparams, gemma_modify),
    "Gemma2ForCausalLM": Recipe("GEMMA2", gemma2_hparams, gemma_modify),
    "Gemma3ForCausalLM": Recipe("GEMMA3", gemma3_hparams, gemma3_modify),
    "Glm4ForCausalLM": Recipe("GLM4", glm4_hparams),
    "SmolLM3ForCausalLM": Recipe("SMOLLM3", llama_hparams, llama_modify, extra=llama_extra),
    "GraniteForCausalLM": Recipe("GRANITE", granite_hparams, llama_modify, extra=llama_extra),
    "GraniteMoeHybridForCausalLM": Recipe("GRANITE_HYBRID", granitehybrid_hparams, granitehybrid_modify,
                                          f32=("ffn_gate_inp", "ssm_conv1d")),
    "Lfm2ForCausalLM": Recipe("LFM2", lfm2_hparams, lfm2_modify, f32=("shortconv.conv",)),
    "Qwen3NextForCausalLM": Recipe("QWEN3NEXT", qwen3next_hparams, qwen3next_modify,
                                   f32=("ffn_gate_inp", "ssm_conv1d")),
    "DeepseekV2ForCausalLM": Recipe("DEEPSEEK2", deepseek2_hparams, deepseek2_modify, f32=("ffn_gate_inp",)),
    "DeepseekV3ForCausalLM": Recipe("DEEPSEEK2", deepseek2_hparams, deepseek2_modify, f32=("ffn_gate_inp",)),
    "Glm4MoeForCausalLM": Recipe("GLM4_MOE", glm4moe_hparams, deepseek2_modify, f32=("ffn_gate_inp",)),
    "Glm4MoeLiteForCausalLM": Recipe("DEEPSEEK2", glm4moelite_hparams, deepseek2_modify, f32=("ffn_gate_inp",)),
    "GptOssForCausalLM": Recipe("GPT_OSS", gpt_oss_hparams, gpt_oss_modify, f32=("ffn_gate_inp",),
                                split_fused_experts=False, mxfp4=gpt_oss_mxfp4),
}

_EXPERT_RE = re.compile(r"^(?P<pre>.*)\.experts\.(?P<e>\d+)\.(?P<w>\w+)\.weight$")


def _tokenizer_metadata(w: Any, hf_dir: Path, vocab_size: int) -> None:
    """_set_vocab_gpt2: tokens by id with their types, merges and special ids (gguf.SpecialVocab)."""
    import gguf

    from tests.helpers.gguf_vocab import vocab_base

    tokens, types = vocab_base(hf_dir, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w)


def write_gguf(hf_dir: Path | str, out: Path | str, *, outtype: str = "f32",
               extra_strings: dict[str, str] | None = None) -> Path:
    """Convert the checkpoint in `hf_dir` to GGUF `out` (outtype f32, f16, bf16 or q8_0);
    `extra_strings` adds string metadata (e.g. a named chat template)."""
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
    if outtype in ("f32", "f16", "bf16") and (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        ftype = gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if (hf_dir / "tokenizer.json").is_file():  # parity checkpoints have none: weights only
        _tokenizer_metadata(w, hf_dir, cfg["vocab_size"])
    for key, value in (extra_strings or {}).items():
        w.add_string(key, value)

    names = gguf.TensorNameMap(arch, cfg["num_hidden_layers"])
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    # stack per-expert weights into one [experts, out, in] tensor, as the converter does
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    plain: list[tuple[str, torch.Tensor]] = []
    for name, t in list(tensors.items()) if recipe.split_fused_experts else ():
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
    for hf_name, raw in recipe.mxfp4(cfg, tensors):
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), raw, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    for name, t in plain:
        if name.endswith(("rotary_emb.inv_freq", "_blocks", "_scales")):
            continue
        t = t.float() if t.dtype not in (torch.float16, torch.float32) else t
        for hf_name, data in recipe.modify(name, t, cfg):
            new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ValueError(f"gguf's TensorNameMap has no name for {hf_name!r}")
            arr = data.float().numpy()
            n_dims = arr.ndim
            keep_f32 = (n_dims <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight")
                        or any(k in new for k in recipe.f32))
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
# converters that read only a sentencepiece tokenizer.model: the tiny tokenizers are byte-level BPE
import conversion.gemma as gemma, conversion.phi as phi
def _gpt2_vocab(self):
    self._set_vocab_gpt2()
gemma.GemmaModel.set_vocab = gemma.Gemma2Model.set_vocab = phi.Phi3MiniModel.set_vocab = _gpt2_vocab
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


def gguf_differences(a: Path | str, b: Path | str) -> list[str]:
    """What differs between two GGUF files: every metadata value but ``general.*`` (name, size
    label) and ``tokenizer.*``, and every tensor's name, type, shape and bytes."""
    import gguf

    readers = gguf.GGUFReader(a), gguf.GGUFReader(b)
    meta = [{k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "general.", "tokenizer."))}
            for r in readers]
    out = []
    for key in sorted(set(meta[0]) | set(meta[1])):
        va, vb = (m.get(key, "<absent>") for m in meta)
        if va != vb:
            out.append(f"metadata {key}: {va!r} != {vb!r}")
    tensors = [{t.name: t for t in r.tensors} for r in readers]
    for name in sorted(set(tensors[0]) | set(tensors[1])):
        if name not in tensors[0] or name not in tensors[1]:
            out.append(f"tensor {name}: only in {'the first' if name in tensors[0] else 'the second'} file")
            continue
        x, y = tensors[0][name], tensors[1][name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            out.append(f"tensor {name}: {x.tensor_type.name}{list(x.shape)} != {y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            out.append(f"tensor {name}: bytes differ")
    return out
