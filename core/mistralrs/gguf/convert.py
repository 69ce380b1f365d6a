"""A GGUF model as the HF checkpoint it was converted from: config.json and tensor names.

llama.cpp's converter (``convert_hf_to_gguf.py``) renames every tensor (``model.layers.3.
self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``), moves config.json into ``{arch}.*``
metadata and rewrites a few tensors (Llama's Q/K rows permuted for its rotary layout, Gemma's
norms stored as ``1 + w``, experts stacked into one 3-D tensor, Llama 3's rope scaling as a
``rope_freqs`` tensor). Undoing that here lets a GGUF file load into the same model plugin as
the safetensors checkpoint, so both run the same code.

An architecture plugin names its converter in ``ArchitectureSpec.gguf_converter``: a function
``(GgufModel) -> GgufConversion``. Most are a few lines over `convert_standard` (the common
hyper-parameters and llama.cpp's common tensor names); see the first-party models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mistralrs.errors import ModelLoadError

# Transforms work on (data, logical shape): data is a float tensor, or GGML block bytes
# (uint8 [..., row_bytes]) for which only whole-row operations are possible.
Transform = Callable[[Any, tuple[int, ...]], tuple[Any, tuple[int, ...]]]


@attrs.frozen
class TensorPart:
    """One HF checkpoint tensor made from (part of) a GGUF tensor."""

    hf_name: str
    gguf_name: str
    transform: Transform | None = None
    # A tensor made from several GGUF tensors (DeepSeek's kv_b_proj from attn_k_b and attn_v_b):
    # `gguf_name` and then `also`, each read as floats (block types dequantized), go to `combine`
    # in that order; the result is a float tensor (`transform` is not used).
    also: tuple[str, ...] = ()
    combine: Callable[[list[Any]], Any] | None = None


@attrs.define
class GgufConversion:
    """config.json (HF keys) and the checkpoint tensors, each from a GGUF tensor."""

    config: dict
    parts: list[TensorPart]


# ------------------------------------------------------------------------- tensor transforms


def take_rows(start: int, stop: int) -> Transform:
    """Rows [start, stop) of a 2-D weight or a 1-D bias (a fused ``attn_qkv`` split)."""

    def f(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        return data[start:stop], (stop - start, *shape[1:])

    return f


def take_expert(index: int) -> Transform:
    """Expert `index` of a stacked ``[experts, out, in]`` tensor (``ffn_*_exps``)."""

    def f(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        return data[index], shape[1:]

    return f


def unpermute_rows(n_head: int) -> Transform:
    """Undo llama.cpp's `LlamaModel.permute` of Q/K rows (its rotary pairs adjacent values; HF
    rotates halves): GGUF rows are [head, dim/2, 2], HF's [head, 2, dim/2]. Whole rows move,
    so it works on GGML block bytes as on floats."""

    def f(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        rows = data.shape[0]
        if rows % (2 * n_head):
            raise ModelLoadError(f"cannot un-permute {rows} rows over {n_head} heads; the GGUF metadata is inconsistent")
        rest = tuple(data.shape[1:])
        out = data.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)
        return out.contiguous(), shape

    return f


def add_value(value: float) -> Transform:
    """w + value (float tensors only): e.g. Gemma's norms, which the converter stored as 1 + w."""

    def f(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        return data.float() + value, shape

    return f


@attrs.frozen
class JoinRows:
    """A `TensorPart.combine` that joins its GGUF tensors by rows, then takes the rows in `order`
    (None: as they come): a fused ``[gate | up]`` the converter split in two, Qwen3-Next's
    ``in_proj_qkvz`` it regrouped. Rows only, so parts of one GGML block type are joined as block
    rows and the result stays quantized (`mistralrs.gguf.loading`); otherwise as floats."""

    order: tuple[int, ...] | None = None

    def __call__(self, tensors: list[Any]) -> Any:
        import torch

        joined = torch.cat(tensors, dim=0)
        return joined if self.order is None else joined[torch.tensor(self.order, dtype=torch.long)]


concat_rows = JoinRows()


def neg_exp_to_log(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """Mamba-2 / Gated DeltaNet's ``A = -exp(A_log)`` (how llama.cpp's converters store it, as
    ``ssm_a`` [H] or [H, 1]) back to ``A_log`` [H] (float32, as A is stored)."""
    import torch

    flat = data.float().reshape(-1)
    return torch.log(-flat), (flat.numel(),)


def reshape_to(*shape: int) -> Transform:
    """A float tensor reshaped (Mamba's ``ssm_conv1d`` [C, K] -> [C, 1, K], ``ssm_norm``
    [groups, n] -> [groups * n])."""

    def f(data: Any, _shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        return data.reshape(shape), tuple(shape)

    return f


def chain(*transforms: Transform | None) -> Transform | None:
    steps = [t for t in transforms if t is not None]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def f(data: Any, shape: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
        for t in steps:
            data, shape = t(data, shape)
        return data, shape

    return f


# -------------------------------------------------------------------------- metadata access


class Hparams:
    """``{arch}.<key>`` metadata of a GGUF model, with the file named in errors."""

    def __init__(self, gguf: Any, arch: str | None = None) -> None:
        self.gguf = gguf
        self.metadata: Mapping[str, Any] = gguf.metadata
        self.arch = arch or gguf.architecture
        self.where = str(gguf.path)

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.metadata

    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(f"{self.arch}.{key}", default)
        return _plain(value)

    def require(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            raise ModelLoadError(f"{self.where}: metadata {full!r} is missing; the GGUF file is incomplete")
        return _plain(self.metadata[full])

    def scalar(self, key: str, default: Any = None) -> Any:
        """A per-model number; a per-layer array whose entries all agree counts as one."""
        value = self.get(key, default)
        if isinstance(value, list):
            if not value:
                return default
            if len(set(value)) != 1:
                raise ModelLoadError(
                    f"{self.where}: metadata '{self.arch}.{key}' varies per layer ({value[:4]}...), which this "
                    "architecture does not support"
                )
            return value[0]
        return value


def _plain(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


# --------------------------------------------------------------------------- standard layout

# llama.cpp's per-block tensor names (gguf-py `TensorNameMap`) -> the HF Llama-style names.
STANDARD_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
}
STANDARD_TOP_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp adds that no HF checkpoint has (their content goes into the config).
CONSUMED_TENSORS = ("rope_freqs.weight",)

# keys may be dotted (LFM2's shortconv.conv); Mamba's ssm_a / ssm_d have no .weight suffix (HF names without one)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_.]+?)(?:\.(weight|bias))?$")
_TOP_RE = re.compile(r"^([A-Za-z0-9_]+)\.(weight|bias)$")


def map_tensors(gguf: Any, *, block_names: Mapping[str, str] = STANDARD_BLOCK_NAMES,
                top_names: Mapping[str, str] = STANDARD_TOP_NAMES,
                layer_prefix: str = "model.layers",
                transforms: Callable[[str, Any], Transform | None] | None = None,
                split: Mapping[str, list[tuple[str, int]]] | None = None,
                skip: tuple[str, ...] = CONSUMED_TENSORS) -> list[TensorPart]:
    """Every tensor of `gguf` under its HF name. `block_names` maps ``blk.N.<key>`` (``{e}`` in
    a value: one tensor per expert of a stacked 3-D tensor), `top_names` the rest. `split`
    cuts a fused GGUF tensor into HF tensors by rows: ``{"attn_qkv": [("self_attn.q_proj", rows),
    ...]}``. `transforms(hf_name, info)` may rewrite a tensor (e.g. `unpermute_rows`). A tensor
    with no mapping is an error naming it."""
    parts: list[TensorPart] = []
    split = split or {}
    for info in gguf:
        name = info.name
        if name in skip:
            continue
        m = _BLOCK_RE.match(name)
        if m:
            layer, key, kind = m.groups()
            prefix = f"{layer_prefix}.{layer}"
            dot_kind = f".{kind}" if kind else ""
            if key in split:
                start = 0
                for split_key, n in split[key]:
                    hf_name = f"{prefix}.{split_key}{dot_kind}"
                    extra = transforms(hf_name, info) if transforms else None
                    parts.append(TensorPart(hf_name, name, chain(take_rows(start, start + n), extra)))
                    start += n
                if start != info.shape[0]:
                    raise ModelLoadError(
                        f"{gguf.path}: tensor {name!r} has {info.shape[0]} rows, but the heads in the metadata "
                        f"make {start}; the GGUF file is inconsistent"
                    )
                continue
            hf_key: str | None = block_names.get(key)
            if hf_key is None:
                raise _unknown(gguf, name)
            if "{e}" in hf_key:
                for e in range(info.shape[0]):
                    hf_name = f"{prefix}.{hf_key.format(e=e)}{dot_kind}"
                    extra = transforms(hf_name, info) if transforms else None
                    parts.append(TensorPart(hf_name, name, chain(take_expert(e), extra)))
                continue
            hf_name = f"{prefix}.{hf_key}{dot_kind}"
        else:
            m = _TOP_RE.match(name)
            hf_key = top_names.get(m.group(1)) if m else None
            if m is None or hf_key is None:
                raise _unknown(gguf, name)
            hf_name = f"{hf_key}.{m.group(2)}"
        parts.append(TensorPart(hf_name, name, transforms(hf_name, info) if transforms else None))
    return parts


def _unknown(gguf: Any, name: str) -> ModelLoadError:
    return ModelLoadError(
        f"{gguf.path}: tensor {name!r} is not part of a {gguf.architecture!r} model as this version knows it; "
        "the file may need a newer mistralrs or another architecture plugin"
    )


def qk_unpermute(hp: Hparams) -> Callable[[str, Any], Transform | None]:
    """The `transforms` that undo llama.cpp's Q/K permutation (Llama-family converters)."""
    n_head = int(hp.scalar("attention.head_count"))
    n_kv = int(hp.scalar("attention.head_count_kv", n_head))

    def f(hf_name: str, info: Any) -> Transform | None:
        if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            return unpermute_rows(n_head)
        if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            return unpermute_rows(n_kv)
        return None

    return f


_ANY_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def trunk_layers(gguf: Any, hp: Hparams) -> tuple[int, tuple[str, ...]]:
    """(decoder layers, the tensors past them): llama.cpp counts the multi-token-prediction
    layers some converters append (GLM-4.5+, GLM-4.7-Flash: ``nextn_predict_layers``, tensors
    ``blk.N.nextn.*`` beside a whole decoder layer) in ``block_count``; inference does not use
    them, as the safetensors models skip them."""
    blocks = int(hp.require("block_count"))
    nextn = int(hp.get("nextn_predict_layers", 0) or 0)
    if not 0 <= nextn < blocks:
        raise ModelLoadError(f"{hp.where}: metadata '{hp.arch}.nextn_predict_layers' is {nextn} of {blocks} blocks; "
                             "the GGUF file is inconsistent")
    layers = blocks - nextn
    past = tuple(name for name in gguf.tensors if (m := _ANY_BLOCK_RE.match(name)) and int(m[1]) >= layers)
    return layers, past


def partial_rotary_factor(hp: Hparams, head_dim: int) -> float | None:
    """``rope.dimension_count`` / head_dim: the rotated share of each head (the converters of
    partial-rotary families store the rotated dimension count, not the factor); None when the
    file does not say."""
    n_rot = hp.scalar("rope.dimension_count")
    if n_rot is None:
        return None
    n_rot = int(n_rot)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ModelLoadError(
            f"{hp.where}: metadata '{hp.arch}.rope.dimension_count' is {n_rot}, which does not fit a head of "
            f"{head_dim} dimensions; the GGUF file is inconsistent"
        )
    return n_rot / head_dim


def sliding_window_layers(hp: Hparams, num_layers: int, default_pattern: int, *,
                          dense_first: bool = False) -> list[bool]:
    """Which layers use the sliding window, as llama.cpp's ``load_swa_pattern`` decides:
    ``attention.sliding_window_pattern`` as one flag per layer, or as n (of every n layers the
    last is global; with `dense_first` the first), else the architecture's `default_pattern`
    (0: every layer sliding)."""
    pattern = hp.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) < num_layers:
            raise ModelLoadError(
                f"{hp.where}: metadata '{hp.arch}.attention.sliding_window_pattern' has {len(pattern)} entries for "
                f"{num_layers} layers; the GGUF file is inconsistent"
            )
        return [bool(p) for p in pattern[:num_layers]]
    n = default_pattern if pattern is None else int(pattern)
    if dense_first:
        return [n == 0 or i % n != 0 for i in range(num_layers)]
    return [n == 0 or i % n < n - 1 for i in range(num_layers)]


def attention_kv_heads(hp: Hparams, n_head: int) -> int:
    """``attention.head_count_kv``: one number, or per layer with 0 for the layers that do not
    attend (hybrid models: Mamba, short-conv, linear-attention layers) and one value for the rest."""
    value = hp.get("attention.head_count_kv")
    if isinstance(value, list):
        attending = [int(v) for v in value if int(v)]
        if attending:
            return int(hp.scalar("attention.head_count_kv")) if len(set(attending)) > 1 else attending[0]
    return int(hp.scalar("attention.head_count_kv", n_head))


def attending_layers(hp: Hparams, num_layers: int) -> list[bool]:
    """Per layer: does it attend (``attention.head_count_kv`` per layer, 0 for a recurrent layer)?"""
    value = hp.get("attention.head_count_kv")
    if not isinstance(value, list):
        return [True] * num_layers
    if len(value) < num_layers:
        raise ModelLoadError(f"{hp.where}: metadata '{hp.arch}.attention.head_count_kv' has {len(value)} entries for "
                             f"{num_layers} layers; the GGUF file is inconsistent")
    return [bool(int(v)) for v in value[:num_layers]]


def standard_config(gguf: Any, *, hf_architecture: str, model_type: str, hp: Hparams | None = None) -> dict:
    """config.json from llama.cpp's common hyper-parameters (``set_gguf_parameters``)."""
    hp = hp or Hparams(gguf)
    n_head = int(hp.scalar("attention.head_count"))
    hidden = int(hp.require("embedding_length"))
    config: dict[str, Any] = {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(hp.require("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": attention_kv_heads(hp, n_head),
        "max_position_embeddings": int(hp.get("context_length", 4096)),
        "rope_theta": float(hp.get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    # optional hyper-parameters: metadata key -> (config.json key, type)
    for meta_key, (hf_key, kind) in {"feed_forward_length": ("intermediate_size", int),
                                     "attention.key_length": ("head_dim", int),
                                     "attention.layer_norm_rms_epsilon": ("rms_norm_eps", float),
                                     "attention.layer_norm_epsilon": ("layer_norm_eps", float)}.items():
        value = hp.scalar(meta_key)
        if value is not None:
            config[hf_key] = kind(value)
    embd = gguf.tensors.get("token_embd.weight")
    vocab = hp.get("vocab_size")
    config["vocab_size"] = int(embd.shape[0]) if embd is not None else int(vocab or len(gguf.metadata.get("tokenizer.ggml.tokens", ())))
    window = hp.get("attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    for meta_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        value = gguf.metadata.get(f"tokenizer.ggml.{meta_key}")
        if value is not None:
            config[hf_key] = int(value)
    # Llama-style optional biases (config.json's attention_bias / mlp_bias), seen in the tensors
    config["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors or "blk.0.attn_qkv.bias" in gguf.tensors
    config["mlp_bias"] = "blk.0.ffn_down.bias" in gguf.tensors
    rope = _rope_scaling(gguf, hp, config)
    if rope is not None:
        config["rope_scaling"] = rope
    return config


def _rope_scaling(gguf: Any, hp: Hparams, config: dict) -> dict | None:
    kind = hp.get("rope.scaling.type")
    factor = hp.get("rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        orig = hp.get("rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for meta_key, hf_key in (("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
                                 ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = hp.get(f"rope.scaling.{meta_key}")
            if value is not None:
                out[hf_key] = float(value)
        return out
    freqs = gguf.tensors.get("rope_freqs.weight")
    if freqs is not None:
        # Llama 3.x: the converter wrote the per-frequency divisors of its llama3 scaling as a tensor.
        factors = gguf.tensor("rope_freqs.weight").float().reshape(-1).tolist()
        if not all(math.isfinite(v) and v > 0 for v in factors):
            raise ModelLoadError(f"{gguf.path}: rope_freqs.weight holds non-positive values; the file is corrupt")
        return {"rope_type": "freq_factors", "freq_factors": factors}
    return None


def convert_standard(gguf: Any, *, hf_architecture: str, model_type: str, permute_qk: bool = False,
                     block_names: Mapping[str, str] | None = None, top_names: Mapping[str, str] | None = None,
                     split_qkv: bool = True, extra_config: Mapping[str, Any] | None = None,
                     transforms: Callable[[str, Any], Transform | None] | None = None,
                     skip: tuple[str, ...] = ()) -> GgufConversion:
    """The conversion of a Llama-shaped GGUF model: `standard_config` plus `extra_config`, the
    standard tensor names (overridden by `block_names` / `top_names`), Q/K un-permuted when
    the converter permuted them, and a fused ``attn_qkv`` split into q/k/v when `split_qkv`;
    the tensors in `skip` are left out."""
    hp = Hparams(gguf)
    config = standard_config(gguf, hf_architecture=hf_architecture, model_type=model_type, hp=hp)
    config.update(extra_config or {})
    names = dict(STANDARD_BLOCK_NAMES)
    names.update(block_names or {})
    tops = dict(STANDARD_TOP_NAMES)
    tops.update(top_names or {})
    split = None
    if split_qkv and "attn_qkv" not in names:
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        q_rows = config["num_attention_heads"] * head_dim
        kv_rows = config["num_key_value_heads"] * head_dim
        split = {"attn_qkv": [(names["attn_q"], q_rows), (names["attn_k"], kv_rows), (names["attn_v"], kv_rows)]}
    steps: list[Callable[[str, Any], Transform | None]] = []
    if permute_qk:
        steps.append(qk_unpermute(hp))
    if transforms is not None:
        steps.append(transforms)

    def combined(hf_name: str, info: Any) -> Transform | None:
        return chain(*(s(hf_name, info) for s in steps))

    parts = map_tensors(gguf, block_names=names, top_names=tops, split=split,
                        transforms=combined if steps else None, skip=CONSUMED_TENSORS + skip)
    return GgufConversion(config=config, parts=parts)
