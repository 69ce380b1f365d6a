"""A reusable pre-norm decoder stack and the causal-LM base that Llama-like families configure.

A family is a `CausalLM` subclass that turns its config.json dict into `DecoderSettings`
(usually `DecoderSettings.from_hf(config, ...)` plus a few family defaults) and, when its layers
differ, a `DecoderLayer` subclass. Module names mirror HF checkpoints::

    model.embed_tokens  model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj, [self_attn.{q,k}_norm],
    post_attention_layernorm, mlp.{gate,up,down}_proj}  model.norm  lm_head

The model contract (DESIGN.md §5): ``forward(input_ids[T], positions[T], batch) -> hidden[T, H]``,
``compute_logits(hidden[S, H]) -> logits[S, V]`` (float32) and ``kv_cache_shape()``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from mistralrs.errors import ModelLoadError
from mistralrs.nn.attention import Attention
from mistralrs.nn.embedding import Embedding, compute_logits
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.norm import RMSNorm

_MISSING = object()


def cfg_get(config: dict, key: str | tuple[str, ...], default: Any = _MISSING, *, arch: str = "this architecture") -> Any:
    """config[key] (first present of several alternative keys); a missing required key is a
    one-line `ModelLoadError`. A JSON null counts as missing."""
    keys = (key,) if isinstance(key, str) else key
    for k in keys:
        value = config.get(k)
        if value is not None:
            return value
    if default is _MISSING:
        raise ModelLoadError(
            f"config.json: missing required key {' or '.join(repr(k) for k in keys)} for {arch}; "
            "add it to config.json (see the model's HF config class for its meaning)"
        )
    return default


def sliding_windows_for(config: dict, num_layers: int, *, policy: str = "none") -> list[int | None]:
    """Per-layer sliding windows.

    policy "none": no sliding window (Llama). "all": ``sliding_window`` on every layer when set
    (Mistral, Mixtral). "qwen": HF Qwen2/Qwen3 — ``layer_types`` when present, else
    ``sliding_window`` on layers >= ``max_window_layers`` when ``use_sliding_window``.
    "layer_types": ``sliding_window`` on the layers ``layer_types`` marks "sliding_attention".
    """
    if policy == "none":
        return [None] * num_layers
    window = config.get("sliding_window")
    if policy == "all":
        return [int(window) if window else None] * num_layers
    if policy == "qwen":
        if not config.get("use_sliding_window", False):
            window = None
        layer_types = config.get("layer_types")
        if layer_types is None:
            mwl = int(config.get("max_window_layers", 28))
            return [int(window) if window and i >= mwl else None for i in range(num_layers)]
        policy = "layer_types"
    if policy == "layer_types":
        layer_types = config.get("layer_types") or ["full_attention"] * num_layers
        if len(layer_types) != num_layers:
            raise ModelLoadError(
                f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}; "
                "make them agree"
            )
        return [int(window) if window and t == "sliding_attention" else None for t in layer_types]
    raise ValueError(f"unknown sliding-window policy {policy!r}")


@attrs.define(kw_only=True)
class DecoderSettings:
    """What the generic decoder stack needs, parsed once from config.json."""

    arch: str = "decoder"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # None | "head" | "head_post_rope" | "full"
    norm_unit_offset: bool = False  # Gemma's (1 + w)
    sliding_windows: list[int | None] = attrs.field(factory=list)
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    rotary_dim: int | None = None  # None: head_dim * partial_rotary_factor (from the rope config)
    use_rotary: bool = True
    config: dict = attrs.field(factory=dict, repr=False)  # the raw config.json, for family-specific keys

    @classmethod
    def from_hf(
        cls,
        config: dict,
        *,
        arch: str,
        sliding_policy: str = "none",
        tie_default: bool = False,
        **overrides: Any,
    ) -> DecoderSettings:
        """The common HF keys: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads, num_key_value_heads (default: heads), head_dim (default
        hidden/heads), rms_norm_eps, hidden_act, tie_word_embeddings, attention_bias, mlp_bias.
        `overrides` replace any parsed field."""
        g = lambda key, default=_MISSING: cfg_get(config, key, default, arch=arch)  # noqa: E731
        hidden = int(g("hidden_size"))
        heads = int(g("num_attention_heads"))
        layers = int(g("num_hidden_layers"))
        if hidden <= 0 or heads <= 0 or layers <= 0:
            raise ModelLoadError(
                f"config.json: hidden_size ({hidden}), num_attention_heads ({heads}) and num_hidden_layers "
                f"({layers}) must be positive for {arch}"
            )
        kv_heads = int(g("num_key_value_heads", heads))
        head_dim = int(g("head_dim", 0) or hidden // heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        attention_bias = bool(g("attention_bias", False))
        fields: dict[str, Any] = dict(
            arch=arch,
            vocab_size=int(g("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(g("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            norm_eps=float(g(("rms_norm_eps", "layer_norm_eps"), 1e-6)),
            hidden_act=str(g(("hidden_act", "hidden_activation"), "silu")),
            tie_word_embeddings=bool(g("tie_word_embeddings", tie_default)),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(g("mlp_bias", False)),
            sliding_windows=sliding_windows_for(config, layers, policy=sliding_policy),
            config=config,
        )
        fields.update(overrides)
        return cls(**fields)


def _ctx_device(ctx: Any) -> Any:
    return getattr(ctx, "device", None) or "cpu"


def _ctx_registry(ctx: Any) -> Any:
    return getattr(ctx, "registry", None)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm1(x)); out = h + mlp(norm2(h)). Subclasses override
    `build_attention` / `build_mlp` / `forward` for other layouts; `mlp_name` is the feed-forward
    submodule's checkpoint name ("mlp"; Mixtral: "block_sparse_moe")."""

    mlp_name: ClassVar[str] = "mlp"

    def __init__(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        device, registry = _ctx_device(ctx), _ctx_registry(ctx)
        self.input_layernorm = RMSNorm(s.hidden_size, s.norm_eps, add_unit_offset=s.norm_unit_offset,
                                       device=device, registry=registry)
        self.self_attn = self.build_attention(s, layer_idx, rotary, ctx)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.norm_eps, add_unit_offset=s.norm_unit_offset,
                                                device=device, registry=registry)
        setattr(self, self.mlp_name, self.build_mlp(s, layer_idx, ctx))

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.mlp_name)

    def build_attention(self, s: DecoderSettings, layer_idx: int, rotary: nn.Module | None, ctx: Any) -> nn.Module:
        window = s.sliding_windows[layer_idx] if s.sliding_windows else None
        return Attention(
            s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim,
            layer_idx=layer_idx, rotary=rotary, qkv_bias=s.qkv_bias, o_bias=s.o_bias, v_head_dim=s.v_head_dim,
            qk_norm=s.qk_norm, qk_norm_eps=s.norm_eps, qk_norm_unit_offset=s.norm_unit_offset,
            scale=s.attn_scale, sliding_window=window, softcap=s.attn_softcap,
            device=_ctx_device(ctx), registry=_ctx_registry(ctx),
        )

    def build_mlp(self, s: DecoderSettings, layer_idx: int, ctx: Any) -> nn.Module:
        return GatedMLP(s.hidden_size, s.intermediate_size, s.hidden_act, bias=s.mlp_bias)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), batch)
        return hidden + self.ffn(self.post_attention_layernorm(hidden))


def build_rotary(config: dict, s: DecoderSettings) -> nn.Module | None:
    """The model's RotaryEmbedding, built on the CPU even inside a meta-device build (its
    frequencies are computed at construction; cos/sin tables follow the positions' device)."""
    if not s.use_rotary:
        return None
    from mistralrs.nn.rotary import RotaryEmbedding

    with torch.device("cpu"):
        return RotaryEmbedding.from_config(config, head_dim=s.head_dim, rotary_dim=s.rotary_dim)


class DecoderModel(nn.Module):
    """HF's ``model``: embed_tokens, layers, norm (and the shared rotary embedding)."""

    layer_cls: ClassVar[type[DecoderLayer]] = DecoderLayer

    def __init__(self, config: dict, s: DecoderSettings, ctx: Any = None,
                 layer_cls: type[DecoderLayer] | None = None) -> None:
        super().__init__()
        device, registry = _ctx_device(ctx), _ctx_registry(ctx)
        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size, scale=s.embed_scale)
        self.rotary_emb = build_rotary(config, s)
        cls = layer_cls or self.layer_cls
        self.layers = nn.ModuleList(cls(s, i, self.rotary_emb, ctx) for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.norm_eps, add_unit_offset=s.norm_unit_offset,
                            device=device, registry=registry)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` (a vision model's merged text and image embeddings) replaces the lookup."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden = layer(positions, hidden, batch)
        return self.norm(hidden)


# Checkpoint tensors no architecture needs (HF's saved rotary tables, attention masks).
DEFAULT_IGNORED_KEYS: tuple[str, ...] = (
    r"(^|\.)rotary_emb\.inv_freq$",
    r"(^|\.)rotary_emb\.original_inv_freq$",
)


class CausalLM(nn.Module):
    """Base of Llama-like causal LMs: ``model`` (a DecoderModel) + ``lm_head`` (absent when tied).

    Subclasses set `arch_name` and override `settings(config)`; `layer_cls` to change the block.
    Loader hooks: `checkpoint_name_map` ((regex, replacement) pairs applied to checkpoint names)
    and `ignored_checkpoint_keys` (regexes of checkpoint tensors to skip).
    """

    arch_name: ClassVar[str] = "decoder"
    layer_cls: ClassVar[type[DecoderLayer]] = DecoderLayer
    checkpoint_name_map: ClassVar[tuple[tuple[str, str], ...]] = ()
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = DEFAULT_IGNORED_KEYS

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        self.config = config
        self.s = self.settings(config)
        self.model = DecoderModel(config, self.s, ctx, layer_cls=self.layer_cls)
        if self.s.tie_word_embeddings:
            self.lm_head = None
        else:
            from mistralrs.nn.linear import Linear

            self.lm_head = Linear(self.s.hidden_size, self.s.vocab_size, bias=False)

    @classmethod
    def settings(cls, config: dict) -> DecoderSettings:
        return DecoderSettings.from_hf(config, arch=cls.arch_name)

    # ---- the model contract ------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compute_logits(hidden, self.lm_head, self.model.embed_tokens, softcap=self.s.final_softcap)

    def kv_cache_shape(self) -> dict[str, int]:
        return dict(
            num_layers=self.s.num_layers,
            num_kv_heads=self.s.num_kv_heads,
            head_dim=self.s.head_dim,
            v_head_dim=self.s.v_head_dim or self.s.head_dim,
        )

    # ---- loader hooks ------------------------------------------------------------------
    def map_checkpoint_name(self, name: str) -> str | None:
        """Checkpoint tensor name -> parameter name, or None to skip the tensor."""
        for pattern, repl in self.checkpoint_name_map:
            name = re.sub(pattern, repl, name)
        if self.lm_head is None and name.startswith("lm_head."):
            return None  # tied: the checkpoint's copy of the embedding is not needed
        for pattern in self.ignored_checkpoint_keys:
            if re.search(pattern, name):
                return None
        return name

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None
