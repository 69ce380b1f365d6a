"""A GGUF model into the model plugin that loads the safetensors version of its architecture.

    load_gguf(paths, arch=None, dtype="auto", device="cpu") -> LoadedModel

1. Parse the file(s) (`reader.GgufModel`; split parts found from the first). A legacy GGML
   file (``ggml``/``ggmf``/``ggjt`` magic) is read by `ggml_legacy.open_ggml` into the same
   `GgufModel` shape, its KV head count from `gqa`.
2. The architecture plugin that lists ``general.architecture`` in its ``gguf_architectures``
   converts the metadata into an HF config and the tensors into HF checkpoint names
   (`convert.GgufConversion`); the config then selects the model class as config.json would
   (a Llama file with experts becomes Mixtral).
3. Build on the meta device. Every `Linear` whose weight is a GGML block type gets the linear
   method of the quantizer registered for that type id (``QuantizerSpec.ggml_type``): its bytes
   are installed as they are, views of the read-only mapped file where no row had to move. A
   quantized token embedding keeps its blocks too and dequantizes the rows it looks up. A block
   type no quantizer stores is an error naming the tensor and its type.
4. Stream the tensors in through the safetensors path (`loading.load_tensor_stream`): shape
   checks, missing tensors, the same post-loading steps (fusing quantized projections ...).

``MISTRALRS_DEBUG=1`` writes ``mistralrs_gguf_tensors.txt`` (name, shape, type of every tensor).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.convert import GgufConversion, JoinRows, TensorPart
from mistralrs.gguf.reader import GgufModel, GgufTensorInfo

log = logging.getLogger("mistralrs.gguf")


def open_model(paths: Any, *, gqa: int = 1) -> GgufModel:
    """The model in `paths`, by magic: a legacy GGML file (one file; `gqa` gives its KV heads)
    or GGUF file(s)."""
    from mistralrs.gguf.ggml_legacy import is_legacy_ggml, open_ggml

    paths = [Path(p) for p in paths]
    if any(is_legacy_ggml(p) for p in paths):
        if len(paths) > 1:
            raise ModelLoadError(f"{paths[0]}: a legacy GGML model is one file; pass only that file")
        return open_ggml(paths[0], gqa=gqa)
    if gqa != 1:
        log.warning("--gqa %s is ignored: %s is a GGUF file, whose metadata gives the KV head count", gqa,
                    paths[0] if paths else "the model")
    return GgufModel.open(paths)


def _debug() -> bool:
    return os.environ.get("MISTRALRS_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def write_tensor_list(gguf: GgufModel, path: Path | str = "mistralrs_gguf_tensors.txt") -> Path:
    """name, shape and type of every tensor, one per line (``MISTRALRS_DEBUG=1``)."""
    path = Path(path)
    lines = [f"{info.name}: shape={list(info.shape)} type={info.type_name}" for info in gguf]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def gguf_architecture_spec(gguf: GgufModel, registry: Any) -> Any:
    """The architecture plugin serving the file's ``general.architecture`` (with a converter)."""
    name = gguf.architecture
    if not name:
        raise ModelLoadError(f"{gguf.path}: metadata 'general.architecture' is missing; the GGUF file is incomplete")
    found = [s for s in registry.architectures if name in s.gguf_architectures and s.gguf_converter]
    if not found:
        supported = sorted({g for s in registry.architectures if s.gguf_converter for g in s.gguf_architectures})
        raise ModelLoadError(
            f"{gguf.path}: GGUF architecture {name!r} is not supported (supported: {', '.join(supported)}); an "
            "architecture plugin adds one by listing it in gguf_architectures with a gguf_converter (docs/gguf.md)"
        )
    found.sort(key=lambda s: (-s.priority, s.name))
    return found[0]


def convert(gguf: GgufModel, registry: Any) -> GgufConversion:
    from mistralrs.specs import resolve

    spec = gguf_architecture_spec(gguf, registry)
    try:
        converter = resolve(spec.gguf_converter)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(
            f"architecture {spec.name!r}: cannot import its GGUF converter {spec.gguf_converter!r} ({exc}); "
            "reinstall the plugin that provides it"
        ) from exc
    return converter(gguf)


def _quantizer_method(registry: Any, info: GgufTensorInfo, gguf: GgufModel) -> Any:
    from mistralrs.specs import resolve

    qspec = registry.quantizer_for_ggml_type(info.ggml_type)
    if qspec is None:
        raise ModelLoadError(
            f"{info.path}: tensor {info.name!r} has type {info.type_name}, which no installed quantizer stores; "
            "use a GGUF file quantized to a supported type (docs/quantization.md lists them)"
        )
    return resolve(qspec.method)(qtype=qspec.name)


class _Parts:
    """The conversion's tensors keyed by the model's own parameter names."""

    def __init__(self, model: Any, conversion: GgufConversion, gguf: GgufModel) -> None:
        from mistralrs.loading import _map_name

        self.by_target: dict[str, TensorPart] = {}
        for part in conversion.parts:
            target = _map_name(model, part.hf_name)
            if target is not None:
                self.by_target[target] = part
        self.gguf = gguf

    def info(self, target: str) -> GgufTensorInfo | None:
        """The GGUF tensor a parameter loads as it is (None: absent, or combined into floats);
        for block rows joined as they are (`_joins_blocks`), the first part's."""
        part = self.by_target.get(target)
        if part is None or (part.also and not _joins_blocks(self.gguf, part)):
            return None
        return self.gguf.tensors[part.gguf_name]


def _assign_quant_methods(model: Any, parts: _Parts, registry: Any, dtype: Any) -> None:
    """Linear layers (and token embeddings) whose GGUF weight is a block type get its quantizer."""
    import torch

    from mistralrs.loading import _cast_floating_params
    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import linear_layers
    from mistralrs.nn.quantized import QuantizedTableLoader

    with torch.device("meta"):
        for name, layer in linear_layers(model):
            info = parts.info(f"{name}.weight" if name else "weight")
            if info is not None and not info.is_plain:
                layer.set_quant_method(_quantizer_method(registry, info, parts.gguf))
        for name, module in model.named_modules():
            if not isinstance(module, Embedding) or module.weight is None:
                continue
            info = parts.info(f"{name}.weight")
            if info is not None and not info.is_plain:
                method = _quantizer_method(registry, info, parts.gguf)
                if callable(getattr(method, "dequantize_rows", None)):
                    setattr(module.weight, "weight_loader", QuantizedTableLoader(module, method))  # noqa: B010
        _cast_floating_params(model, dtype)


def _read_part(gguf: GgufModel, part: TensorPart, cache: dict[str, Any]) -> Any:
    """The tensor of a part: a float tensor, or GgmlBlocks for a block type."""
    from mistralrs.nn.quantized import GgmlBlocks

    info = gguf.tensors[part.gguf_name]
    data = cache.get(part.gguf_name)
    if data is None:
        data = gguf.tensor(part.gguf_name)
        if _no_mmap():
            data = data.clone()
        cache.clear()  # parts of one tensor come together (experts, fused qkv)
        cache[part.gguf_name] = data
    shape = info.shape
    if part.transform is not None:
        data, shape = part.transform(data, shape)
    if info.is_plain:
        return data
    return GgmlBlocks(data, info.ggml_type, shape)


def _joins_blocks(gguf: GgufModel, part: TensorPart) -> bool:
    """A `JoinRows` part whose 2-D tensors share one GGML block type: joined as block rows."""
    infos = [gguf.tensors[name] for name in (part.gguf_name, *part.also)]
    return (isinstance(part.combine, JoinRows) and not infos[0].is_plain and all(len(i.shape) == 2 for i in infos)
            and len({(i.ggml_type, i.shape[-1]) for i in infos}) == 1)


def _combined(gguf: GgufModel, part: TensorPart, cache: dict[str, Any], to_float: Callable[[Any, Any], Any]) -> Any:
    """A part made from several GGUF tensors: each as floats (whole rows dequantized), combined;
    or their block rows joined as they are (`_joins_blocks`)."""
    from mistralrs.nn.quantized import GgmlBlocks

    if _joins_blocks(gguf, part):
        blocks = [_read_part(gguf, TensorPart(part.hf_name, name), cache) for name in (part.gguf_name, *part.also)]
        assert part.combine is not None
        data = part.combine([b.data for b in blocks])
        return GgmlBlocks(data, blocks[0].ggml_type, (int(data.shape[0]), blocks[0].shape[-1]))

    values = []
    for name in (part.gguf_name, *part.also):
        info = gguf.tensors[name]
        data = _read_part(gguf, TensorPart(part.hf_name, name), cache)
        if isinstance(data, GgmlBlocks):  # dequantize as one [rows, inner] matrix, then the real shape
            rows = math.prod(info.shape[:-1])
            data = to_float(GgmlBlocks(data.data.reshape(rows, -1), info.ggml_type, (rows, info.shape[-1])), info)
            data = data.reshape(info.shape)
        values.append(data.float())
    assert part.combine is not None, f"{part.hf_name}: a part with `also` needs `combine`"
    return part.combine(values)


def _no_mmap() -> bool:
    return os.environ.get("MISTRALRS_NO_MMAP", "").strip().lower() in ("1", "true", "yes", "on")


def _dequantizing(registry: Any, gguf: GgufModel) -> Callable[[Any, Any], Any]:
    """For a float parameter fed GGML blocks (no quantized form there): dequantize them."""
    import torch

    from mistralrs.nn.linear import Linear
    from mistralrs.nn.quantized import GgmlBlocks

    def to_float(value: Any, info: GgufTensorInfo) -> Any:
        if not isinstance(value, GgmlBlocks):
            return value
        method = _quantizer_method(registry, info, gguf)
        out, inner = value.shape[0], value.shape[-1]
        with torch.device("meta"):
            tmp = Linear(inner, out, quant_method=method)
        method.load_ggml(tmp, value)
        return method.dequantize(tmp).reshape(value.shape)

    return to_float


def load_gguf(
    paths: Any,
    *,
    arch: str | None = None,
    dtype: Any = "auto",
    device: Any = "cpu",
    registry: Any = None,
    tokenizer_dir: Path | None = None,
    gqa: int = 1,
    device_map: Any = None,
) -> Any:
    """Load GGUF file(s), or one legacy GGML file (`gqa`: its grouped-query factor), into a
    ready-to-run `LoadedModel` (see the module doc). The parsed file stays reachable as
    ``loaded.gguf`` (tokenizer, chat template). `device_map`: as `loading.load_model`'s."""
    import torch

    from mistralrs.dtypes import resolve_dtype
    from mistralrs.loading import (
        LoadContext,
        LoadedModel,
        build_model,
        finish_loading,
        load_tensor_stream,
        materialize,
        place_on_meta,
        resident_weight_bytes,
        select_architecture,
    )

    t0 = time.perf_counter()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    gguf = open_model(paths, gqa=gqa)
    try:
        if _debug():
            write_tensor_list(gguf)
        conversion = convert(gguf, registry)
        config = conversion.config
        spec = select_architecture(config, arch, registry, config_path=gguf.path)
        dev = torch.device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        ctx = LoadContext(config=config, dtype=torch_dtype, device=dev, registry=registry, arch=spec,
                          model_dir=tokenizer_dir or gguf.path.parent)
        model = build_model(spec, config, ctx)
        parts = _Parts(model, conversion, gguf)
        _assign_quant_methods(model, parts, registry, torch_dtype)
        placement, device_of = place_on_meta(model, device_map)
        materialize(model, dev, device_of)
        expected = dict(model.state_dict(keep_vars=True))
        to_float = _dequantizing(registry, gguf)

        def stream() -> Iterator[tuple[Path, str, tuple[int, ...], Callable[[], Any]]]:
            from mistralrs.loading import _map_name

            cache: dict[str, Any] = {}
            for part in conversion.parts:
                info = gguf.tensors[part.gguf_name]
                target = _map_name(model, part.hf_name)
                dest = expected.get(target) if target is not None else None
                if part.also:
                    value = _combined(gguf, part, cache, to_float)
                else:
                    value = _read_part(gguf, part, cache)  # a view (or one transformed tensor): cheap
                if dest is None or getattr(dest, "weight_loader", None) is None:
                    value = to_float(value, info)
                yield info.path, part.hf_name, tuple(value.shape), _constant(value)
                del value

        nbytes = load_tensor_stream(model, stream(), where=str(gguf.path), arch_name=spec.name, action="loading")
        finish_loading(model, None)
        if placement is not None:
            from mistralrs.device_placement import install

            install(model, placement)
    except BaseException:
        gguf.close()
        raise
    loaded = LoadedModel(
        model=model, config=config, arch=spec, dtype=torch_dtype, device=dev, model_dir=tokenizer_dir or gguf.path.parent,
        weight_files=tuple(gf.path for gf in gguf.files), load_seconds=time.perf_counter() - t0,
        weight_bytes=resident_weight_bytes(model) or nbytes, gguf=gguf,
    )
    return loaded


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value
