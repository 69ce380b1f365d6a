"""GGUF ``granitehybrid`` files (Granite 4.0 H: Mamba-2 + attention, MoE with a shared MLP).

What llama.cpp's ``GraniteHybridModel`` converter (a ``Mamba2Model`` and a ``GraniteMoeModel``)
rewrote, undone here:

- Which layers attend: ``attention.head_count_kv`` per layer, 0 for a Mamba layer.
- Mamba-2: ``A_log`` stored as A = -exp(A_log) (``ssm_a`` [H, 1], no .weight suffix; back to
  log(-A)), ``D`` as ``ssm_d`` [H, 1], ``conv1d.weight`` squeezed to [C, K], the gated norm as
  ``ssm_norm`` [groups, d_inner / groups], ``dt_bias`` as ``ssm_dt.bias``. Sizes: ``ssm.inner_size``
  (d_inner), ``ssm.time_step_rank`` (the head count), ``ssm.state_size``, ``ssm.group_count``,
  ``ssm.conv_kernel``. The chunk size is not stored (it does not change the result).
- Attention Q/K rows permuted as Llama's (undone), whatever the rope.
- Rope: ``rope.scaling.finetuned`` is llama.cpp's switch for it (the converter writes false for
  Granite 4.0 H, which has none, and true for Bamba); its graph then rotates with the file's base.
- Experts: ``input_linear`` [E, 2I, H] split into ``ffn_gate_exps`` / ``ffn_up_exps``; the shared MLP's
  ``input_linear`` into ``ffn_gate_shexp`` / ``ffn_up_shexp`` (``ffn_gate`` / ``ffn_up`` in a dense
  model): joined back by rows (block rows as they are in a quantized file: `concat_rows`).
- Granite's multipliers under llama.cpp's names (as ``granite``'s converter).
"""

from __future__ import annotations

import re
from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import (
    GgufConversion,
    Hparams,
    TensorPart,
    Transform,
    attending_layers,
    concat_rows,
    map_tensors,
    neg_exp_to_log,
    reshape_to,
    standard_config,
    unpermute_rows,
)

BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ssm_in": "mamba.in_proj",
    "ssm_conv1d": "mamba.conv1d",
    "ssm_dt": "mamba.dt",  # .bias -> dt_bias below
    "ssm_a": "mamba.A_log",
    "ssm_d": "mamba.D",
    "ssm_norm": "mamba.norm",
    "ssm_out": "mamba.out_proj",
    "ffn_gate_inp": "block_sparse_moe.router.layer",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.gate_proj",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.up_proj",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.down_proj",
    # the shared MLP (dense models: under the plain FFN names); gate/up joined below
    "ffn_gate_shexp": "shared_mlp.gate",
    "ffn_up_shexp": "shared_mlp.up",
    "ffn_down_shexp": "shared_mlp.output_linear",
    "ffn_gate": "shared_mlp.gate",
    "ffn_up": "shared_mlp.up",
    "ffn_down": "shared_mlp.output_linear",
}


def _flatten(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    return data.reshape(-1), (data.numel(),)


def convert(gguf: Any) -> GgufConversion:
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture="GraniteMoeHybridForCausalLM", model_type="granitemoehybrid", hp=hp)
    layers = config["num_hidden_layers"]
    attends = attending_layers(hp, layers)
    n_head = config["num_attention_heads"]
    d_inner, n_heads = int(hp.require("ssm.inner_size")), int(hp.require("ssm.time_step_rank"))
    hidden = config["hidden_size"]
    if d_inner % hidden or d_inner % n_heads:
        raise ModelLoadError(f"{hp.where}: ssm.inner_size {d_inner} is not a multiple of the hidden size {hidden} and "
                             f"of ssm.time_step_rank {n_heads}; the GGUF file is inconsistent")
    n_experts = int(hp.get("expert_count", 0) or 0)
    rope = hp.get("rope.scaling.finetuned", True)  # llama.cpp's default: rope on
    config.update({
        "head_dim": hidden // n_head,
        "layer_types": ["attention" if a else "mamba" for a in attends],
        "position_embedding_type": "rope" if rope else "nope",
        "mamba_n_heads": n_heads,
        "mamba_d_head": d_inner // n_heads,
        "mamba_expand": d_inner // hidden,
        "mamba_d_state": int(hp.require("ssm.state_size")),
        "mamba_n_groups": int(hp.require("ssm.group_count")),
        "mamba_d_conv": int(hp.require("ssm.conv_kernel")),
        "mamba_conv_bias": _any_layer(gguf, "ssm_conv1d.bias"),
        "mamba_proj_bias": _any_layer(gguf, "ssm_in.bias"),
        "num_local_experts": n_experts,
        "num_experts_per_tok": int(hp.get("expert_used_count", 0) or 0),
        "shared_intermediate_size": int(hp.get("expert_shared_feed_forward_length")
                                        or _rows(gguf, ("ffn_gate_shexp", "ffn_gate"))),
        "embedding_multiplier": float(hp.get("embedding_scale") or 1.0),
        "residual_multiplier": float(hp.get("residual_scale") or 1.0),
        "attention_multiplier": float(hp.get("attention.scale") or (hidden // n_head) ** -0.5),
        "logits_scaling": float(hp.get("logit_scale") or 1.0),
    })
    if n_experts:
        config["intermediate_size"] = int(hp.get("expert_feed_forward_length") or hp.require("feed_forward_length"))

    def transforms(hf_name: str, info: Any) -> Transform | None:
        if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            return unpermute_rows(n_head)
        if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            return unpermute_rows(config["num_key_value_heads"])
        if hf_name.endswith(".A_log"):
            return neg_exp_to_log
        if hf_name.endswith((".mamba.D", ".mamba.norm.weight")):
            return _flatten
        if hf_name.endswith(".mamba.conv1d.weight"):
            channels, kernel = info.shape
            return reshape_to(channels, 1, kernel)
        return None

    parts = map_tensors(gguf, block_names=BLOCK_NAMES, transforms=transforms)
    return GgufConversion(config=config, parts=_join_shared_mlp(parts, hp.where))


def _any_layer(gguf: Any, suffix: str) -> bool:
    return any(name.startswith("blk.") and name.endswith("." + suffix) for name in gguf.tensors)


def _rows(gguf: Any, keys: tuple[str, ...]) -> int:
    for name, info in gguf.tensors.items():
        if name.startswith("blk.") and any(name.endswith(f".{k}.weight") for k in keys):
            return int(info.shape[0])
    return 0


def _join_shared_mlp(parts: list[TensorPart], where: str) -> list[TensorPart]:
    """``shared_mlp.gate`` + ``shared_mlp.up`` -> the fused ``shared_mlp.input_linear`` [gate | up];
    ``mamba.dt.bias`` -> ``mamba.dt_bias``."""
    ups = {p.hf_name: p for p in parts if ".shared_mlp.up." in p.hf_name}
    out = []
    for part in parts:
        name = part.hf_name
        if ".shared_mlp.up." in name:
            continue
        if ".shared_mlp.gate." in name:
            up = ups.pop(name.replace(".gate.", ".up."), None)
            if up is None:
                raise ModelLoadError(f"{where}: tensor {part.gguf_name!r} has no shared up projection beside it; "
                                     "the GGUF file is incomplete")
            out.append(TensorPart(name.replace(".gate.", ".input_linear."), part.gguf_name, also=(up.gguf_name,),
                                  combine=concat_rows))
            continue
        if name.endswith(".mamba.dt.bias"):
            part = TensorPart(name.removesuffix(".dt.bias") + ".dt_bias", part.gguf_name, part.transform)
        out.append(part)
    if ups:
        raise ModelLoadError(f"{where}: tensor {next(iter(ups.values())).gguf_name!r} has no shared gate projection "
                             "beside it; the GGUF file is incomplete")
    return out
