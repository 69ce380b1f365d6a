"""Rotary position embeddings (RoPE) and every HF ``rope_scaling`` flavour the supported
text families use: ``default``, ``linear``, ``dynamic`` (dynamic NTK), ``ntk_alpha`` (HunYuan:
a "dynamic" config with an ``alpha``, which fixes the base at ``theta * alpha ** (d / (d - 2))``,
whatever the length, as transformers' HunYuan rotary does), ``yarn``, ``longrope`` (Phi-3 /
Phi-4, also spelled ``su``) and ``llama3``.

The inverse frequencies are computed with exactly the float32 operations transformers'
``modeling_rope_utils`` uses (same operand order, same dtypes), and the angles as
``float32(position) * inv_freq``, so cos/sin agree with transformers bit-for-bit on CPU. At
positions in the tens of thousands float32 angles carry ~1e-3 rad of rounding, so computing
them "more accurately" (float64) would *disagree* with the reference models were trained and
evaluated with.

Config handling follows transformers 5's standardisation of ``config.json``:

* the parameters come from ``rope_scaling`` (old name; wins when set) or ``rope_parameters``
  (new name); the type from ``rope_type`` or the older ``type`` (``rope_type`` wins);
* ``rope_theta`` from that dict, else the top level, else the family default (10000; 2e6 for
  SmolLM3);
* ``partial_rotary_factor`` from that dict, else the top level, else the family default
  (Phi 0.5, GLM/GLM-4 0.5, StableLM 0.25), else 1.0;
* for ``llama3``/``yarn``/``longrope`` a *top-level* ``original_max_position_embeddings`` (Phi-3
  stores it there) wins over the one in the dict, which wins over ``max_position_embeddings``.

Multimodal RoPE (Qwen2-VL's M-RoPE, ``rope_scaling.type == "mrope"`` or an ``mrope_section`` in
the rope parameters): positions may be ``[C, T]`` (temporal, height, width); each rotary
frequency takes its angle from one component, by contiguous sections (Qwen2-VL, Qwen2.5-VL) or
interleaved t/h/w (Qwen3-VL, ``mrope_interleaved``). With 1-D positions (text) every component
is the same and it is plain RoPE.

Per-step cost is one ``index_select`` into a cached cos/sin table (built lazily up to
``max_position_embeddings`` on the device of the positions, grown by doubling). ``dynamic``
beyond ``max_position_embeddings`` recomputes its frequencies for the sequence length, as
transformers does. Unlike transformers' module (which keeps grown ``dynamic`` frequencies
until the length drops below ``max_position_embeddings``), this module is stateless: the
frequencies depend only on the ``seq_len`` of the call, so batches from different requests
cannot influence each other. For monotonically growing lengths (generation) the two agree.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mistralrs.errors import ModelLoadError

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "RotaryEmbedding",
    "compute_inv_freq",
    "resolve_rope_parameters",
    "static_positions",
]

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "ntk_alpha", "yarn", "longrope", "llama3",
                                         "freq_factors")

# transformers' family defaults, applied when config.json omits the key (as HF's config classes do).
_DEFAULT_THETA = {"smollm3": 2_000_000.0}
_DEFAULT_PARTIAL_ROTARY_FACTOR = {"phi": 0.5, "glm": 0.5, "glm4": 0.5, "glm4_moe": 0.5, "stablelm": 0.25,
                                  "qwen3_next": 0.25}
# Families whose HF implementation rotates adjacent pairs (GPT-J style) rather than halves.
_INTERLEAVED_MODEL_TYPES = frozenset({"glm", "glm4", "chatglm"})

_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "ntk_alpha": ("alpha",),
    "yarn": (),  # factor falls back to max_position_embeddings / original_max_position_embeddings
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    # GGUF files: llama.cpp's per-frequency divisors (the `rope_freqs` tensor of Llama 3.x files)
    "freq_factors": ("freq_factors",),
}


def _err(message: str) -> ModelLoadError:
    return ModelLoadError(message)


def _as_number(value: Any, what: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(f"config.json {what} must be a number, got {value!r}")
    if positive and not value > 0:
        raise _err(f"config.json {what} must be > 0, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# config.json -> standardised rope parameters
# --------------------------------------------------------------------------------------------


def resolve_rope_parameters(config: dict, *, layer_type: str | None = None) -> dict:
    """The standardised rope parameters of a raw HF ``config.json`` dict, as transformers 5
    would hold them in ``config.rope_parameters`` (a new dict; `config` is not modified).

    Keys: ``rope_type`` (one of `SUPPORTED_ROPE_TYPES`), ``rope_theta``,
    ``partial_rotary_factor``, the type's own parameters, ``original_max_position_embeddings``
    for llama3/yarn/longrope, and ``_source_key`` (the config.json key they came from, for
    error messages). `layer_type` selects an entry of a per-layer-type nested dict
    (e.g. ``"full_attention"``)."""
    if not isinstance(config, dict):
        raise _err(f"config.json must be a JSON object to read rope parameters, got {type(config).__name__}")
    model_type = str(config.get("model_type") or "")

    source_key = "rope_parameters"
    raw: Any = config.get("rope_parameters")
    if config.get("rope_scaling"):  # transformers: `rope_scaling or rope_parameters`
        source_key, raw = "rope_scaling", config["rope_scaling"]
    if raw is None:
        raw = {}
    if isinstance(raw, str):  # a few early Phi-3 configs: "rope_scaling": "su"
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise _err(f"config.json {source_key} must be an object, got {type(raw).__name__}")

    nested = {k: v for k, v in raw.items() if isinstance(v, dict)}
    if nested:
        if layer_type is None:
            raise _err(
                f"config.json {source_key} is nested per layer type ({', '.join(sorted(nested))}); "
                "pass layer_type= to choose one"
            )
        if layer_type not in nested:
            raise _err(
                f"config.json {source_key} has no entry for layer type '{layer_type}'; "
                f"present: {', '.join(sorted(nested))}"
            )
        raw = nested[layer_type]
        source_key = f"{source_key}.{layer_type}"
    params = dict(raw)

    rope_type = params.get("rope_type") or params.get("type") or "default"
    if not isinstance(rope_type, str):
        raise _err(f"config.json {source_key}.rope_type must be a string, got {rope_type!r}")
    # transformers' Phi-3 config maps the legacy names onto longrope.
    if rope_type == "su" or (rope_type == "yarn" and model_type == "phi3"):
        rope_type = "longrope"
    if rope_type == "mrope":  # Qwen2-VL's name for default frequencies with an mrope_section
        rope_type = "default"
    if rope_type == "dynamic" and params.get("alpha"):  # HunYuan's checkpoints label ntk_alpha "dynamic"
        rope_type = "ntk_alpha"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _err(
            f"unsupported rope type '{rope_type}' in config.json {source_key}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    params.pop("type", None)
    params["rope_type"] = rope_type

    theta = params.get("rope_theta")
    if theta is None:
        theta = config.get("rope_theta")
    if theta is None:
        theta = _DEFAULT_THETA.get(model_type, 10_000.0)
    params["rope_theta"] = float(_as_number(theta, "rope_theta"))

    prf = params.get("partial_rotary_factor")
    if prf is None:
        prf = config.get("partial_rotary_factor")
    if prf is None:
        prf = _DEFAULT_PARTIAL_ROTARY_FACTOR.get(model_type, 1.0)
    prf = _as_number(prf, "partial_rotary_factor")
    if prf > 1:
        raise _err(f"config.json partial_rotary_factor must be in (0, 1], got {prf!r}")
    params["partial_rotary_factor"] = prf

    for key in _REQUIRED_KEYS[rope_type]:
        if params.get(key) is None:
            raise _err(
                f"config.json {source_key} of type '{rope_type}' is missing '{key}'; "
                f"{rope_type} requires: {', '.join(_REQUIRED_KEYS[rope_type])}"
            )

    mpe = config.get("max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope"):
        orig = config.get("original_max_position_embeddings")  # top level wins (Phi-3)
        if orig is None:
            orig = params.get("original_max_position_embeddings")
        if orig is None and model_type == "phi3":
            orig = 4096  # Phi3Config's default
        if orig is None:
            orig = mpe
        if orig is None:
            raise _err(
                f"config.json {source_key} of type '{rope_type}' needs original_max_position_embeddings "
                "(or max_position_embeddings)"
            )
        params["original_max_position_embeddings"] = int(_as_number(orig, "original_max_position_embeddings"))
    if rope_type == "dynamic" and mpe is None:
        raise _err("config.json max_position_embeddings is required by rope type 'dynamic'")

    for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor",
                "mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        if params.get(key) is not None:
            _as_number(params[key], f"{source_key}.{key}", positive=key in ("factor", "low_freq_factor", "high_freq_factor"))
    if rope_type == "llama3" and not params["high_freq_factor"] > params["low_freq_factor"]:
        raise _err(
            f"config.json {source_key}.high_freq_factor must be greater than low_freq_factor, "
            f"got {params['high_freq_factor']!r} <= {params['low_freq_factor']!r}"
        )
    if rope_type == "freq_factors":
        value = params["freq_factors"]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in value
        ):
            raise _err(f"{source_key}.freq_factors must be a list of positive numbers")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            value = params[key]
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
            ):
                raise _err(f"config.json {source_key}.{key} must be a list of numbers")

    params["_source_key"] = source_key
    return params


# --------------------------------------------------------------------------------------------
# inverse frequencies: transcriptions of transformers.modeling_rope_utils (keep op order!)
# --------------------------------------------------------------------------------------------


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _linear(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = _default_inv_freq(p["rope_theta"], dim)
    inv_freq /= p["factor"]
    return inv_freq, 1.0


def _default(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(p["rope_theta"], dim), 1.0


def _dynamic(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    factor = p["factor"]
    assert mpe is not None
    if seq_len is None or seq_len <= mpe:
        # transformers' init path (python floats); identical to what it keeps for short inputs.
        seq = mpe
        base = base * ((factor * seq / mpe) - (factor - 1)) ** (dim / (dim - 2))
    else:
        # transformers' forward path: seq_len = max(position_ids) + 1 as an int64 tensor, so
        # the new base is computed in float32.
        seq_t = torch.maximum(torch.tensor(seq_len, dtype=torch.int64), torch.tensor(mpe, dtype=torch.int64))
        base = base * ((factor * seq_t / mpe) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return inv_freq, 1.0


def _ntk_alpha(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    alpha = _as_number(p["alpha"], "rope alpha")
    return _default_inv_freq(p["rope_theta"] * alpha ** (dim / (dim - 2)), dim), 1.0


def _yarn(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    factor = p.get("factor")
    attention_factor = p.get("attention_factor")
    mscale = p.get("mscale")
    mscale_all_dim = p.get("mscale_all_dim")
    original = p["original_max_position_embeddings"]
    if factor is None:
        if mpe is None:
            raise _err(f"config.json {p['_source_key']} of type 'yarn' needs 'factor' (or max_position_embeddings)")
        factor = mpe / original

    def get_mscale(scale: float, mscale: float = 1) -> float:
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)

    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def find_correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = find_correction_dim(beta_fast)
    high = find_correction_dim(beta_slow)
    if p.get("truncate", True):
        low = math.floor(low)
        high = math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def _longrope(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    factor = p.get("factor")
    attention_factor = p.get("attention_factor")
    original = p["original_max_position_embeddings"]
    if factor is None:
        if mpe is None:
            raise _err(
                f"config.json {p['_source_key']} of type 'longrope' needs 'factor' (or max_position_embeddings)"
            )
        factor = mpe / original
    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len and seq_len > original else "short_factor"
    ext_factors = torch.tensor(p[key], dtype=torch.float32)
    if ext_factors.numel() != dim // 2:
        raise _err(
            f"config.json {p['_source_key']}.{key} has {ext_factors.numel()} entries; "
            f"longrope with rotary dim {dim} needs {dim // 2}"
        )
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (ext_factors * base**inv_freq_shape)
    return inv_freq, float(attention_factor)


def _llama3(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = _default_inv_freq(p["rope_theta"], dim)
    factor = p["factor"]
    low_freq_factor = p["low_freq_factor"]
    high_freq_factor = p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq_llama, 1.0


def _freq_factors(p: dict, dim: int, mpe: int | None, seq_len: int | None) -> tuple[torch.Tensor, float]:
    # llama.cpp: theta_i / freq_factors[i] (how GGUF files carry Llama 3.x rope scaling)
    factors = torch.tensor(p["freq_factors"], dtype=torch.float32)
    if factors.numel() != dim // 2:
        raise _err(f"rope freq_factors has {factors.numel()} entries; the rotary dim {dim} needs {dim // 2}")
    return _default_inv_freq(p["rope_theta"], dim) / factors, 1.0


_INIT_FUNCTIONS: dict[str, Callable[[dict, int, int | None, int | None], tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "ntk_alpha": _ntk_alpha,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
    "freq_factors": _freq_factors,
}


def compute_inv_freq(
    params: dict, rotary_dim: int, *, max_position_embeddings: int | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rotary_dim // 2] on CPU, attention_scaling) for standardised `params`
    (see `resolve_rope_parameters`), as transformers' ``ROPE_INIT_FUNCTIONS`` compute them.
    `seq_len` matters for ``dynamic`` and ``longrope`` only."""
    with torch.no_grad():
        return _INIT_FUNCTIONS[params["rope_type"]](params, int(rotary_dim), max_position_embeddings, seq_len)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


def _rotary_kernel(device: Any = "cpu") -> Callable[..., torch.Tensor]:
    """The registered ``rotary`` kernel for the device (the torch reference when none is)."""
    from mistralrs.nn.kernels import lookup_kernel

    return lookup_kernel("rotary", device)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over flattened tokens.

    ``cos_sin(positions, seq_len)`` returns float32 ``[T, rotary_dim // 2]`` tables (already
    multiplied by `attention_scaling`); ``forward(q, k, positions, seq_len)`` rotates the first
    `rotary_dim` dims of ``q [T, Hq, D]`` and ``k [T, Hk, D]`` and passes the rest through.
    `interleaved` selects GPT-J pairwise rotation (GLM) instead of NeoX half rotation.
    """

    rotary_dim: int
    attention_scaling: float
    interleaved: bool

    def __init__(
        self,
        rotary_dim: int,
        *,
        params: dict | None = None,
        base: float = 10_000.0,
        max_position_embeddings: int | None = None,
        interleaved: bool = False,
        mrope_section: Any = None,
        mrope_interleaved: bool = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        rotary_dim = int(rotary_dim)
        if rotary_dim <= 0 or rotary_dim % 2:
            raise _err(f"rotary dim must be a positive even number, got {rotary_dim}")
        if params is None:
            params = {"rope_type": "default", "rope_theta": float(base), "_source_key": "rope_parameters"}
        self.params = params
        self.rope_type: str = params["rope_type"]
        self.rotary_dim = rotary_dim
        self.interleaved = bool(interleaved)
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings: int | None = params.get("original_max_position_embeddings")

        inv_freq, self.attention_scaling = compute_inv_freq(
            params, rotary_dim, max_position_embeddings=max_position_embeddings
        )
        self.attention_scaling = float(self.attention_scaling)
        # inv_freq variants (CPU float32); cos/sin tables per variant live on the positions' device.
        self._inv_freq: dict[str, torch.Tensor] = {"base": inv_freq}
        self._scaling: dict[str, float] = {}
        if self.rope_type == "longrope":
            assert self.original_max_position_embeddings is not None
            self._inv_freq["long"], _ = compute_inv_freq(
                params, rotary_dim, max_position_embeddings=max_position_embeddings,
                seq_len=self.original_max_position_embeddings + 1,
            )
            # Phi-3.5-MoE's longrope carries its own cos/sin factors per variant (transformers' Phimoe)
            for variant, key in (("base", "short_mscale"), ("long", "long_mscale")):
                if params.get(key) is not None:
                    self._scaling[variant] = float(params[key])
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mrope_section = [int(x) for x in mrope_section] if mrope_section else None
        self.mrope_interleaved = bool(mrope_interleaved)
        self._mrope_component = _mrope_components(self.mrope_section, rotary_dim // 2, self.mrope_interleaved)
        self._dynamic_cache: tuple[int, torch.Tensor] | None = None
        self._last: tuple[Any, ...] | None = None
        self._kernel: Callable[..., torch.Tensor] | None = None
        if device is not None and torch.device(device).type != "meta":
            self._table("base", self._initial_size("base"), torch.device(device))

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: dict,
        *,
        head_dim: int,
        rotary_dim: int | None = None,
        device: Any = None,
        interleaved: bool | None = None,
        layer_type: str | None = None,
    ) -> RotaryEmbedding:
        """Build from a raw HF ``config.json`` dict. `rotary_dim` defaults to
        ``int(head_dim * partial_rotary_factor)``; `interleaved` defaults to the family's layout
        (pairwise for GLM/GLM-4, halves otherwise); `layer_type` picks one entry of a
        per-layer-type ``rope_parameters``."""
        params = resolve_rope_parameters(config, layer_type=layer_type)
        head_dim = int(head_dim)
        if rotary_dim is None:
            rotary_dim = int(head_dim * params["partial_rotary_factor"])
        rotary_dim = int(rotary_dim)
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise _err(
                f"config.json partial_rotary_factor {params['partial_rotary_factor']} gives rotary dim "
                f"{rotary_dim} for head_dim {head_dim}; it must be even and in (0, head_dim]"
            )
        if interleaved is None:
            interleaved = str(config.get("model_type") or "") in _INTERLEAVED_MODEL_TYPES
        mpe = config.get("max_position_embeddings")
        return cls(
            rotary_dim,
            params=params,
            max_position_embeddings=int(mpe) if mpe is not None else None,
            interleaved=interleaved,
            mrope_section=params.get("mrope_section"),
            mrope_interleaved=bool(params.get("mrope_interleaved", False)),
            device=device,
        )

    # ---- tables ------------------------------------------------------------------------

    @property
    def inv_freq(self) -> torch.Tensor:
        """The frequencies used for short inputs (float32, CPU)."""
        return self._inv_freq["base"]

    def _initial_size(self, variant: str) -> int:
        if self.rope_type == "longrope" and variant == "base":
            return int(self.original_max_position_embeddings or 4096)
        return int(self.max_position_embeddings or 4096)

    def _table(self, variant: str, needed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._tables.get(variant)
        if cached is not None and cached[0].shape[0] >= needed:
            if cached[0].device != device:
                cached = (cached[0].to(device), cached[1].to(device))
                self._tables[variant] = cached
            return cached
        size = max(needed, self._initial_size(variant))
        if cached is not None:
            size = max(size, 2 * cached[0].shape[0])
        with torch.no_grad():
            t = torch.arange(size, dtype=torch.int64, device=device)
            cos, sin = self._cos_sin_of(t, self._inv_freq[variant], self._scaling.get(variant))
        self._tables[variant] = (cos, sin)
        return cos, sin

    def _cos_sin_of(self, positions: torch.Tensor, inv_freq: torch.Tensor,
                    scaling: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers: freqs = position_ids[..., None].float() * inv_freq; cos = freqs.cos() * scaling
        freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
        scale = self.attention_scaling if scaling is None else scaling
        return freqs.cos() * scale, freqs.sin() * scale

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        if self._dynamic_cache is not None and self._dynamic_cache[0] == seq_len:
            return self._dynamic_cache[1]
        inv_freq, _ = compute_inv_freq(
            self.params, self.rotary_dim, max_position_embeddings=self.max_position_embeddings, seq_len=seq_len
        )
        self._dynamic_cache = (seq_len, inv_freq)
        return inv_freq

    # ---- public API ----------------------------------------------------------------------

    def cos_sin(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (float32, ``positions.shape + (rotary_dim // 2,)``, times `attention_scaling`).

        `seq_len` is the longest sequence length in the batch (default ``max(positions) + 1``);
        ``dynamic`` recomputes its frequencies when it exceeds ``max_position_embeddings`` and
        ``longrope`` switches to ``long_factor`` when it exceeds
        ``original_max_position_embeddings``, both like transformers."""
        seq_arg = seq_len
        if positions.dim() == 2 and self._mrope_component is not None:
            return self._mrope_cos_sin(positions)
        last = self._last
        if (
            last is not None
            and last[0] is positions
            and last[1] == _version_of(positions)
            and last[2] == seq_arg
            and last[5] == _static["epoch"]
        ):
            return last[3], last[4]

        flat = positions.reshape(-1)
        if flat.dtype not in (torch.int64, torch.int32):
            flat = flat.long()
        half = self.rotary_dim // 2
        if flat.numel() == 0:
            empty = torch.empty(*positions.shape, half, dtype=torch.float32, device=positions.device)
            return empty, empty.clone()

        if _static["max_positions"] is not None:  # a CUDA graph capture: no host read of the positions
            if self.rope_type in ("dynamic", "longrope"):
                raise GraphUnsafeRope(f"{self.rope_type} rotary frequencies depend on the sequence length")
            max_pos = _static["max_positions"]
        else:
            max_pos = int(flat.max()) + 1
        if seq_len is None:
            seq_len = max_pos
        seq_len = int(seq_len)

        if (
            self.rope_type == "dynamic"
            and self.max_position_embeddings is not None
            and seq_len > self.max_position_embeddings
        ):
            cos, sin = self._cos_sin_of(flat, self._dynamic_inv_freq(seq_len))
        else:
            variant = "base"
            if self.rope_type == "longrope" and seq_len > int(self.original_max_position_embeddings or 0):
                variant = "long"
            cos_t, sin_t = self._table(variant, max_pos, flat.device)
            cos, sin = cos_t.index_select(0, flat), sin_t.index_select(0, flat)

        shape = (*positions.shape, half)
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        # Every layer calls with the same positions tensor: remember the last answer.
        self._last = (positions, _version_of(positions), seq_arg, cos, sin, _static["epoch"])
        return cos, sin

    def _mrope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim // 2] of positions [C, T]: each frequency's angle from its component."""
        last = self._last
        if last is not None and last[0] is positions and last[1] == _version_of(positions) and last[2] == "mrope":
            return last[3], last[4]
        comp = self._mrope_component
        assert comp is not None
        if positions.shape[0] <= int(comp.max()):
            raise ValueError(f"M-RoPE needs {int(comp.max()) + 1} position components, got {positions.shape[0]}")
        cos_t, sin_t = self._table("base", int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        index = comp.to(positions.device).expand(positions.shape[1], -1).unsqueeze(0)  # [1, T, half]
        cos = cos_t[positions].gather(0, index)[0]
        sin = sin_t[positions].gather(0, index)[0]
        self._last = (positions, _version_of(positions), "mrope", cos, sin, _static["epoch"])
        return cos, sin

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (first `rotary_dim` dims; dtype kept)."""
        cos, sin = self.cos_sin(positions, seq_len)
        kernel = self._kernel
        if kernel is None:
            kernel = self._kernel = _rotary_kernel(q.device)
        return (
            kernel(q, cos, sin, self.rotary_dim, self.interleaved),
            kernel(k, cos, sin, self.rotary_dim, self.interleaved),
        )

    def extra_repr(self) -> str:
        extra = ""
        if self.attention_scaling != 1.0:
            extra = f", attention_scaling={self.attention_scaling:.6g}"
        return (
            f"rope_type={self.rope_type}, rotary_dim={self.rotary_dim}, theta={self.params['rope_theta']:g}, "
            f"interleaved={self.interleaved}{extra}"
        )


def _mrope_components(section: list[int] | None, half: int, interleaved: bool) -> torch.Tensor | None:
    """Which position component (0 t, 1 h, 2 w) each of the `half` frequencies rotates by:
    contiguous sections (Qwen2-VL: chunk i takes component i % 3) or, `interleaved`
    (Qwen3-VL), h on frequencies 1, 4, 7, ... < 3 * section[1], w on 2, 5, 8, ... < 3 * section[2],
    t on the rest."""
    if not section:
        return None
    if sum(section) != half:
        raise _err(f"config.json mrope_section {section} must sum to half the rotary dim ({half})")
    if interleaved:
        comp = torch.zeros(half, dtype=torch.long)
        for dim in (1, 2):
            if dim < len(section):
                comp[dim:section[dim] * 3:3] = dim
        return comp
    return torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])


class GraphUnsafeRope(RuntimeError):
    """This rotary embedding cannot run without reading positions on the host (CUDA graph capture)."""


# While a CUDA graph is captured (`engine.decode_graphs`): the bound on positions, so `cos_sin` indexes its
# table without reading them back (a host sync, not allowed in a capture); and an epoch that changes with
# every capture, so no cos/sin computed outside it is reused inside.
_static: dict[str, Any] = {"max_positions": None, "epoch": 0}


@contextlib.contextmanager
def static_positions(max_positions: int) -> Iterator[None]:
    """Within: every position is below `max_positions` and `cos_sin` does not read positions on the host.
    Rotary types whose frequencies depend on the sequence length (dynamic, longrope) raise
    `GraphUnsafeRope` there."""
    _static["max_positions"], _static["epoch"] = int(max_positions), _static["epoch"] + 1
    try:
        yield
    finally:
        _static["max_positions"], _static["epoch"] = None, _static["epoch"] + 1


def _version_of(t: torch.Tensor) -> int:
    """The in-place version counter; inference tensors (torch.inference_mode) have none and
    cannot be modified in place outside inference mode, so 0 is safe for them."""
    return 0 if t.is_inference() else t._version
