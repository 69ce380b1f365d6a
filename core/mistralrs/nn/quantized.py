"""The base of every linear method that stores its weight quantized.

A quantizer plugin subclasses `QuantizedLinearMethod` and implements four things:

- ``quantize(weight[out, in] float) -> {name: tensor}``: the state tensors of the format
  (e.g. ``{"qweight": uint8[out, row_bytes]}`` for GGML blocks, scales and zeros for HQQ).
- ``dequantize(layer) -> float32[out, in]``: the reference view of the weight (tests, the
  reference matmul, re-quantization).
- ``matmul(layer, x2d, out_f32) -> [rows, out]``: the forward without bias; the default is
  the reference (dequantize, then ``F.linear``); formats with kernels look them up instead.
- ``check_shape(out_features, in_features) -> reason | None``: whether a layer shape can take
  this format (GGML k-quants need ``in % 256 == 0``); the ISQ plan falls back per layer.

The life cycle (docs/quantization.md): at build time `create_weights` registers the float
``weight`` (on the meta device, costing nothing) with a ``weight_loader``, so when the loader
streams the checkpoint tensor in, it is quantized at once and the float copy is dropped: a
model is never held in full precision and quantized at the same time (peak memory stays near
the quantized size, one layer's float weight above it). ``process_after_loading`` quantizes a
weight that was filled in place instead (dummy weights). The state tensors become buffers of
the layer under their names, so ``state_dict()`` holds the quantized form.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.linear import Linear, LinearMethodBase


class QuantizedLinearMethod(LinearMethodBase):
    """A method whose weight is quantized to the type `qtype` (ISQ: from float weights at load)."""

    # Every state tensor has one row per output feature (dim 0), so layers sharing an input can
    # be fused by concatenating their states (`fuse_rows`); GGML blocks and AFQ groups are.
    rows_state = False
    # The layer's importance (an imatrix row: mean squared activation per input column, float32
    # [in_features]) when ISQ has one (``--imatrix`` / ``--calibration-file``): a quantizer may
    # weight its rounding error by it; formats that do not ignore it.
    importance: torch.Tensor | None = None

    def __init__(self, qtype: str, **options: Any) -> None:
        self.qtype = qtype.lower()
        self.options = options

    # -- what a format implements -------------------------------------------------------------
    def check_shape(self, out_features: int, in_features: int) -> str | None:
        """Why a [out, in] weight cannot take this format (None: it can)."""
        return None

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, layer: Linear) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        """x [rows, in] -> [rows, out] (no bias). Reference: dequantize, then F.linear in fp32."""
        y = F.linear(x.float(), self.dequantize(layer))
        return y if out_f32 else y.to(x.dtype)

    def ggml_state(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of a weight that arrives already quantized as GGML block bytes (uint8
        [out, row_bytes]: a GGUF tensor of the spec's ``ggml_type``), taken as it is."""
        raise NotImplementedError(f"{self.qtype} does not store GGML blocks")

    def load_ggml(self, layer: Linear, blocks: GgmlBlocks) -> None:
        """Install GGML block bytes (a GGUF tensor) as the layer's state, dropping the float weight."""
        expected = (layer.out_features, layer.in_features)
        if tuple(blocks.shape) != expected or blocks.data.shape[0] != layer.out_features:
            from mistralrs.errors import ModelLoadError

            raise ModelLoadError(
                f"a {self.qtype} tensor of shape {list(blocks.shape)} given to a layer of shape {list(expected)}; "
                "the model file does not match its metadata"
            )
        self.set_state(layer, self.ggml_state(blocks.data))

    # -- UQFF records (docs/uqff.md): the family is the spec's ``uqff_format`` tag ---------------
    def uqff_entries(self, layer: Linear) -> dict[str, torch.Tensor]:
        """The layer's UQFF record besides ``weight.format`` and ``bias``: {suffix: tensor} with
        suffixes ``weight`` and ``weight.<field>``, laid out as mistral.rs writes this family."""
        raise NotImplementedError(f"{self.qtype} has no UQFF record")

    @classmethod
    def uqff_qtype(cls, entries: dict[str, torch.Tensor]) -> str | None:
        """The type name a record of this family holds; None for a float weight the family
        stores (``uqff_float_weight``). Raise ValueError for a record that is not valid."""
        raise NotImplementedError(f"{cls.__name__} reads no UQFF records")

    @classmethod
    def uqff_float_weight(cls, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{cls.__name__} stores no float weights in UQFF records")

    @classmethod
    def uqff_split(cls, entries: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
        """A record of stacked MoE experts ([E, out, in]) as `parts` records, one per expert."""
        raise ValueError(f"{cls.__name__} cannot read stacked expert records")

    @classmethod
    def uqff_stack(cls, records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """Per-expert records as one stacked record (mistral.rs's layout for MoE experts); None
        when this family does not stack."""
        return None

    def uqff_state(self, entries: dict[str, torch.Tensor], out_features: int,
                   in_features: int) -> dict[str, torch.Tensor]:
        """The layer state from a record of this type. Raise ValueError naming what does not fit."""
        raise NotImplementedError(f"{self.qtype} reads no UQFF records")

    def load_uqff(self, layer: Linear, entries: dict[str, torch.Tensor]) -> None:
        """Install a UQFF record as the layer's state, dropping the float weight."""
        try:
            state = self.uqff_state(entries, layer.out_features, layer.in_features)
        except ValueError as exc:
            from mistralrs.errors import ModelLoadError

            raise ModelLoadError(f"{exc}; the UQFF file does not match config.json") from None
        self.set_state(layer, state)

    def state_bytes(self, layer: Linear) -> int:
        return sum(b.numel() * b.element_size() for b in self.state(layer).values())

    # -- the life cycle -----------------------------------------------------------------------
    def create_weights(self, layer: Linear) -> None:
        weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        weight.weight_loader = _Loader(self, layer)  # type: ignore[attr-defined]
        layer.weight = weight
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.empty(layer.out_features), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        layer._quant_state_names = ()  # type: ignore[assignment]

    def load_float(self, layer: Linear, tensor: torch.Tensor) -> None:
        """Quantize a float [out, in] weight into `layer` and drop the float parameter."""
        expected = (layer.out_features, layer.in_features)
        if tuple(tensor.shape) != expected:
            from mistralrs.errors import ModelLoadError

            raise ModelLoadError(
                f"weight of shape {list(tensor.shape)} given to a {self.qtype} layer of shape {list(expected)}; "
                "config.json does not match the weights"
            )
        with isq_threads():
            state = self.quantize(tensor)
        self.set_state(layer, state)

    def set_state(self, layer: Linear, state: dict[str, torch.Tensor]) -> None:
        """Install the quantized state tensors as buffers (dropping the float weight)."""
        if "weight" in layer._parameters:
            del layer._parameters["weight"]
        for name, tensor in state.items():
            layer.register_buffer(name, tensor, persistent=True)
        layer._quant_state_names = tuple(state)  # type: ignore[assignment]

    def state(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {name: getattr(layer, name) for name in getattr(layer, "_quant_state_names", ())}

    def is_quantized(self, layer: Linear) -> bool:
        return bool(getattr(layer, "_quant_state_names", ()))

    def process_after_loading(self, layer: Linear) -> None:
        weight = layer._parameters.get("weight")
        if weight is not None and not self.is_quantized(layer):
            if weight.is_meta:
                raise RuntimeError(f"{self.qtype} layer was never filled")
            self.load_float(layer, weight.detach())

    def apply(self, layer: Linear, x: torch.Tensor, out_f32: bool = False) -> torch.Tensor:
        # Runs for every matmul of every decode step: plain [tokens, in] inputs skip the reshapes.
        flat = x.dim() == 2
        y = self.matmul(layer, x if flat else x.reshape(-1, x.shape[-1]), out_f32)
        bias = layer.bias
        if isinstance(bias, torch.Tensor):
            y = y + bias.to(y.dtype)
        return y if flat else y.reshape(*x.shape[:-1], y.shape[-1])

    def describe(self) -> str:
        return self.qtype


class CheckpointLinearMethod(QuantizedLinearMethod):
    """A layer stored quantized in a Hugging Face checkpoint (``config.json``'s
    ``quantization_config``: GPTQ, AWQ, ...), loaded as published.

    `checkpoint_tensors(out, in)` names the layer's tensors in the checkpoint with their shapes and
    dtypes; they are registered as buffers under those names, so the loader fills them like any
    tensor (a missing or misshapen one is the usual one-line error naming the file). Then
    `process_after_loading` calls `convert(layer)`, which returns the runtime state (e.g. the same
    weights re-laid out exactly as a fast block format's bytes), or None to keep the tensors.
    `marker` is the suffix whose presence in the checkpoint says a layer is stored this way;
    `present` holds the layer's suffixes the checkpoint has (optional tensors such as ``g_idx``).
    `fused_suffixes` ((suffix, name), ...): a checkpoint tensor ``<fused><suffix>`` (MoE experts
    stacked, GPT-OSS's ``experts.gate_up_proj_blocks``) splits as the float ``<fused>`` would (the
    model's ``split_checkpoint_tensor``), giving each expert layer its tensor `name`."""

    marker = "qweight"
    fused_suffixes: tuple[tuple[str, str], ...] = ()

    def __init__(self, qtype: str, *, quant_config: dict | None = None, **options: Any) -> None:
        super().__init__(qtype, **options)
        self.quant_config = dict(quant_config or {})
        self.present: frozenset[str] = frozenset()

    def checkpoint_tensors(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        """{buffer name: (shape, dtype)}; shape None: the tensor as the checkpoint holds it, shape
        and dtype (checked in `convert`). A checkpoint suffix with dots (``weight.absmax``) is the
        name with ``__``."""
        raise NotImplementedError

    def convert(self, layer: Linear) -> dict[str, torch.Tensor] | None:
        return None

    def create_weights(self, layer: Linear) -> None:
        specs = self.checkpoint_tensors(layer.out_features, layer.in_features)
        for name, (shape, dtype) in specs.items():
            if shape is None:  # taken as it arrives (a parameter: its loader survives materialising)
                p = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
                p.weight_loader = _adopt  # type: ignore[attr-defined]
                p.keep_dtype = True  # type: ignore[attr-defined]
                layer.register_parameter(name, p)
            else:
                layer.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=True)
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.empty(layer.out_features), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        layer._quant_state_names = tuple(specs)  # type: ignore[assignment]

    def process_after_loading(self, layer: Linear) -> None:
        state = self.convert(layer)
        if state is None:
            return
        for name in getattr(layer, "_quant_state_names", ()):
            if name not in state:
                layer._buffers.pop(name, None)
                layer._parameters.pop(name, None)
        for name in state:
            if name in layer._parameters:
                del layer._parameters[name]
        self.set_state(layer, state)

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.qtype} is a checkpoint format: it loads as published and cannot quantize weights")


def _adopt(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value  # a tensor taken as the checkpoint holds it (shape and dtype)


# float32 elements dequantized at a time by `chunked_reference_matmul` (64 MB)
_CHUNK_ELEMENTS = 1 << 24


def chunked_reference_matmul(x: torch.Tensor, out_features: int, in_features: int, rows: Any) -> torch.Tensor:
    """x [n, in] @ W.T in float32, W dequantized `rows(r0, r1)` a block of output rows at a time
    (the reference forward of formats without a kernel: the float32 temporary stays small)."""
    xf = x.to(torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, in_features))
    if out_features <= step:
        return F.linear(xf, rows(0, out_features))
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        y[:, r0:r1] = F.linear(xf, rows(r0, r1))
    return y


def block_scale_rows(scale: torch.Tensor, block: tuple[int, int] | None, r0: int, r1: int,
                     in_features: int) -> torch.Tensor:
    """The scale of every weight of rows r0..r1 (float32 [r1 - r0, in_features]) from block scales
    [ceil(out / bn), ceil(in / bk)] (`block` (bn, bk), edge blocks partial), or the one scale of the
    tensor (`block` None: a 0-d tensor, broadcast)."""
    s = scale.to(torch.float32)
    if block is None:
        return s.reshape(())
    bo, bi = block
    rows = s[r0 // bo:-(-r1 // bo)].repeat_interleave(bo, dim=0)[r0 % bo:r0 % bo + (r1 - r0)]
    return rows.repeat_interleave(bi, dim=1)[:, :in_features]


def fuse_rows(layers: list[Linear]) -> Linear | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)`` in a single matmul, when
    every layer has the same quantized type whose state is laid out per output row
    (`QuantizedLinearMethod.rows_state`, e.g. GGML blocks). The layers' state tensors become views
    of the fused ones, so no memory is added; None when the layers cannot be fused."""
    methods = [layer.quant_method for layer in layers]
    first = methods[0]
    if not isinstance(first, QuantizedLinearMethod) or not first.rows_state or len(layers) < 2:
        return None
    if any(type(m) is not type(first) or m.qtype != first.qtype or not m.is_quantized(layer)  # type: ignore[attr-defined]
           for m, layer in zip(methods, layers)):
        return None
    if len({layer.in_features for layer in layers}) != 1 or len({layer.bias is None for layer in layers}) != 1:
        return None
    states = [m.state(layer) for m, layer in zip(methods, layers)]  # type: ignore[attr-defined]
    names = list(states[0])
    if any(list(st) != names or any(st[n].shape[1:] != states[0][n].shape[1:] for n in names) for st in states):
        return None  # (also: states kept in different layouts)
    fused_state = {name: torch.cat([st[name] for st in states], dim=0) for name in names}
    with torch.device("meta"):
        fused = Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                       bias=layers[0].bias is not None, quant_method=type(first)(first.qtype, **first.options))
    fused.quant_method.set_state(fused, fused_state)  # type: ignore[attr-defined]
    for name in names:
        # each layer's rows of the state as it holds them (a kernel's layout may pack several rows into one)
        start = 0
        for layer, st in zip(layers, states):
            stop = start + st[name].shape[0]
            layer._buffers[name] = fused_state[name][start:stop]
            start = stop
    if layers[0].bias is not None:
        bias = torch.cat([layer.bias for layer in layers])  # type: ignore[misc]
        fused.bias = nn.Parameter(bias, requires_grad=False)
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.bias = nn.Parameter(bias[start:stop], requires_grad=False)
            start = stop
    return fused


def still_fused(fused: Linear | None, layers: list[Linear]) -> bool:
    """Whether the layers' first state tensor still is a view of the fused layer's (a re-quantized
    or replaced layer ends a fusion)."""
    if fused is None:
        return False
    names = getattr(fused, "_quant_state_names", ())
    if not names:
        return False
    base = getattr(fused, names[0])
    offset = 0
    for layer in layers:
        t = layer._buffers.get(names[0])
        if t is None or t.data_ptr() != base.data_ptr() + offset:
            return False
        offset += t.numel() * t.element_size()
    return True


class Prequantized:
    """A weight that arrives already quantized (a GGUF block tensor, a UQFF record): a quantized
    layer's ``weight_loader`` installs it as it is instead of quantizing."""

    __slots__ = ()
    shape: tuple[int, ...]

    def install(self, method: QuantizedLinearMethod, layer: Linear) -> None:
        raise NotImplementedError


class GgmlBlocks(Prequantized):
    """GGML block bytes (uint8 [out, row_bytes]) of type id `ggml_type`, for a [out, in] weight
    `shape` (`QuantizedLinearMethod.load_ggml`)."""

    __slots__ = ("data", "ggml_type", "shape")

    def __init__(self, data: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> None:
        self.data, self.ggml_type, self.shape = data, ggml_type, tuple(shape)

    def install(self, method: QuantizedLinearMethod, layer: Linear) -> None:
        method.load_ggml(layer, self)


class UqffRecord(Prequantized):
    """A UQFF layer record: {suffix: tensor} (`QuantizedLinearMethod.load_uqff`), for a [out, in]
    weight `shape`."""

    __slots__ = ("entries", "shape")

    def __init__(self, entries: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
        self.entries, self.shape = entries, tuple(shape)

    def install(self, method: QuantizedLinearMethod, layer: Linear) -> None:
        method.load_uqff(layer, self.entries)


class QuantizedTableLoader:
    """``weight_loader`` of a token embedding whose table arrives quantized (a GGUF block tensor,
    a UQFF record): the table becomes the embedding's quantized head, which looks rows up."""

    def __init__(self, embedding: nn.Module, method: QuantizedLinearMethod) -> None:
        self.embedding, self.method = embedding, method

    def __call__(self, param: torch.Tensor, value: torch.Tensor | Prequantized) -> None:
        emb = self.embedding
        if not isinstance(value, Prequantized):
            param.copy_(value)
            return
        with torch.device("meta"):
            table = Linear(emb.embedding_dim, emb.num_embeddings, quant_method=self.method)  # type: ignore[arg-type]
        value.install(self.method, table)
        emb.set_quantized_head(table)  # type: ignore[operator]


class _Loader:
    """The float weight's ``weight_loader``: quantize as the tensor streams in (or install GGML
    blocks that arrive quantized)."""

    def __init__(self, method: QuantizedLinearMethod, layer: Linear) -> None:
        self.method = method
        # A weak reference would do, but the layer owns the parameter that owns this object,
        # so the cycle is collected with the layer.
        self.layer = layer

    def __call__(self, param: torch.Tensor, tensor: torch.Tensor | Prequantized) -> None:
        if isinstance(tensor, Prequantized):
            tensor.install(self.method, self.layer)
        else:
            self.method.load_float(self.layer, tensor)


class isq_threads:
    """Quantize on one thread when ``MISTRALRS_ISQ_SINGLETHREAD`` is set (as mistral.rs does)."""

    def __enter__(self) -> None:
        self.saved = None
        if os.environ.get("MISTRALRS_ISQ_SINGLETHREAD", "").strip().lower() not in ("", "0", "false", "no"):
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            torch.set_num_threads(self.saved)
