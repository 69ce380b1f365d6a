"""Loading a UQFF export (``--from-uqff``, ``Which.*(from_uqff=...)``): no original weights read.

    load_uqff(["out/q4k-0.uqff"], config_dir="out") -> LoadedModel

1. `resolve_uqff_files`: each value is a shard path (absolute, or relative to the model
   directory), a type name or bit count (``q4k`` / ``4`` -> ``q4k-0.uqff``); a shard brings its
   siblings ``<stem>-0.uqff``, ``<stem>-1.uqff`` ... along.
2. `UqffSet.open`: every shard's version entries are checked (another major, or a newer minor,
   is refused with both versions named), its records grouped by key; the sibling
   ``residual.safetensors`` must exist. Every failure is a one-line error naming the file,
   raised before any weight is used.
3. The model is built from config.json on the meta device; every layer with a record gets the
   linear method of the quantizer registered for the record's family and type (the spec's
   ``uqff_format``, then the family's ``uqff_qtype``); an unquantized record (family 1) or a
   float one stays a float layer; a record for a token embedding makes its quantized table;
   stacked expert records (``experts.gate_proj`` [E, out, in]) are split per expert. A record no
   layer of the model takes means the file belongs to another model: an error.
4. The residual tensors and the records stream in through `loading.load_tensor_stream`
   (missing tensors are errors, as for safetensors), then the usual post-loading steps.

The layers' tensors are views of the mapped files: loading reads little, and the pages come in on
first use (``MISTRALRS_NO_MMAP=1`` copies them into memory instead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.uqff import container as C
from mistralrs.uqff.records import FORMAT

_SMALL = 64  # entries of at most this many elements are read when choosing a layer's type


# ------------------------------------------------------------------------------------ files


def _shorthand_name(value: str, device_type: str, registry: Any) -> str | None:
    """``q4k`` / ``4`` -> ``q4k-0.uqff`` (None when `value` is not a type or bit count)."""
    from mistralrs.errors import ConfigError
    from mistralrs.quantization import resolve_isq_type

    if value.endswith(".uqff") or "/" in value or os.sep in value:
        return None
    try:
        spec = resolve_isq_type(value, device_type=device_type, registry=registry, source="--from-uqff")
    except ConfigError:
        return None
    return C.shard_name(spec.name, 0)


def uqff_file_names(values: Any) -> list[str]:
    """``--from-uqff`` values: a string with ``;`` between files, or a list of them."""
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values or ())
    return [p.strip() for item in items for p in str(item).split(";") if p.strip()]


def resolve_uqff_files(values: Any, root: Path | None = None, *, device_type: str = "cpu",
                       registry: Any = None) -> list[Path]:
    """The shard files `values` name (see the module doc), siblings included, in order."""
    names = uqff_file_names(values)
    if not names:
        raise ModelLoadError("--from-uqff names no file; give a .uqff shard (e.g. q4k-0.uqff)")
    found: list[Path] = []
    for value in names:
        candidates = [Path(value).expanduser()]
        if root is not None:
            candidates.append(Path(root) / value)
            short = _shorthand_name(value, device_type, registry)
            if short is not None:
                candidates.append(Path(root) / short)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            where = f" (looked in {root})" if root is not None else ""
            raise ModelLoadError(f"--from-uqff {value}: no such UQFF file{where}; give the path of a .uqff shard")
        for p in _with_siblings(path):
            if p not in found:
                found.append(p)
    return found


def shards_in_listing(values: Any, listing: list[str], *, device_type: str = "cpu", registry: Any = None,
                      where: str = "the repository") -> list[str]:
    """The repository files (of `listing`, the ``.uqff`` names) a ``--from-uqff`` load needs:
    the named shards with their siblings, and ``residual.safetensors`` beside them."""
    names: list[str] = []
    for value in uqff_file_names(values):
        name = value if value in listing else _shorthand_name(value, device_type, registry)
        if name is None or name not in listing:
            shown = ", ".join(listing[:8]) or "none"
            raise ModelLoadError(f"--from-uqff {value}: {where} has no such UQFF file (it has: {shown})")
        parsed = C.parse_shard_name(Path(name).name)
        group = [name]
        if parsed is not None:
            parent = str(Path(name).parent)
            prefix = "" if parent == "." else parent + "/"
            group = []
            i = 0
            while f"{prefix}{C.shard_name(parsed[0], i)}" in listing:
                group.append(f"{prefix}{C.shard_name(parsed[0], i)}")
                i += 1
            if name not in group:
                group.append(name)
        for n in group:
            if n not in names:
                names.append(n)
        parent = str(Path(name).parent)
        residual = C.RESIDUAL if parent == "." else f"{parent}/{C.RESIDUAL}"
        if residual not in names:
            names.append(residual)
    return names


def _with_siblings(path: Path) -> list[Path]:
    parsed = C.parse_shard_name(path.name)
    if parsed is None:
        return [path]
    stem, _index = parsed
    out = []
    i = 0
    while (path.parent / C.shard_name(stem, i)).is_file():
        out.append(path.parent / C.shard_name(stem, i))
        i += 1
    return out if path in out else [*out, path]


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class _Mapped:
    """One safetensors file, mapped copy-on-write (`gguf.reader.map_file`): its tensors are
    writable views of the mapping, whose pages are read on first use and shared with the page
    cache (as for GGUF files); ``MISTRALRS_NO_MMAP=1`` copies each into memory instead. The header
    is checked against the file size, so a truncated file is an error before any weight is used."""

    def __init__(self, path: Path, kind: str = "UQFF") -> None:
        import json
        import struct

        from mistralrs.gguf.reader import map_file
        from mistralrs.loading import _no_mmap

        self.path = path
        self.copy = _no_mmap()
        self.mm: Any = map_file(path, kind, "--from-uqff")
        try:
            size = len(self.mm)
            if size < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", self.mm[:8])
            if 8 + n > size:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(bytes(self.mm[8:8 + n]))
            header.pop("__metadata__", None)
            self.start = 8 + n
            self.infos: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
            for name, info in header.items():
                dtype = _DTYPES.get(info["dtype"])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(v) for v in info["data_offsets"])
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has dtype {info['dtype']}")
                itemsize = getattr(__import__("torch"), dtype).itemsize
                if end - begin != _numel(shape) * itemsize or self.start + end > size:
                    raise ValueError(f"tensor {name!r} lies beyond the end of the file")
                self.infos[name] = (dtype, shape, begin, end)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.close()
            raise ModelLoadError(f"{path}: not a readable {kind}/safetensors file, it is truncated or corrupt "
                                 f"({exc}); write or download it again") from None
        self.keys = list(self.infos)
        self.shapes = {k: v[1] for k, v in self.infos.items()}

    def get(self, key: str) -> Any:
        import torch

        dtype_name, shape, begin, end = self.infos[key]
        dtype = getattr(torch, dtype_name)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=self.start + begin)
        if self.copy or (self.start + begin) % dtype.itemsize:
            raw = raw.clone()  # (a misaligned tensor is copied: views need aligned elements)
        return raw.view(dtype).view(shape)

    def close(self) -> None:
        self.mm = None  # the views keep the mapping alive as long as they live


class UqffSet:
    """The shards of one load, their records by key, and the residual file."""

    def __init__(self) -> None:
        self.files: list[_Mapped] = []
        self.records: dict[str, tuple[_Mapped, list[str]]] = {}  # key -> (file, full tensor names)
        self.residual: Path | None = None

    @classmethod
    def open(cls, paths: list[Path], *, allow_newer_minor: bool = False, need_residual: bool = True) -> UqffSet:
        self = cls()
        try:
            for path in paths:
                f = _Mapped(Path(path))
                self.files.append(f)
                self._check_version(f, allow_newer_minor)
                self._group(f)
            residual = Path(paths[0]).parent / C.RESIDUAL
            if not need_residual:
                return self
            if not residual.is_file():
                raise ModelLoadError(f"{residual}: the residual file of {Path(paths[0]).name} is missing; a UQFF shard "
                                     "loads only from its export directory (copy residual.safetensors beside it)")
            self.residual = residual
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _check_version(f: _Mapped, allow_newer_minor: bool = False) -> None:
        if not all(k in f.shapes for k in C.VERSION_KEYS):
            raise ModelLoadError(f"{f.path}: no UQFF version entries (uqff.version.*); it is not a UQFF 1.x file "
                                 "(pre-1.0 UQFF files must be written again with `mistralrs quantize`)")
        major, minor, patch = (int(f.get(k).item()) for k in C.VERSION_KEYS)
        want_major, want_minor, _ = C.VERSION
        if major != want_major or (minor > want_minor and not allow_newer_minor):
            raise ModelLoadError(
                f"{f.path}: UQFF version {major}.{minor}.{patch}, but this build reads {want_major}.x up to "
                f"{want_major}.{want_minor}; upgrade mistralrs or write the file again with this version"
            )

    def _group(self, f: _Mapped) -> None:
        suffix = "." + FORMAT
        prefixes = [k[: -len(suffix)] for k in f.keys if k.endswith(suffix)]
        by_prefix: dict[str, list[str]] = {p: [] for p in prefixes}
        for k in f.keys:
            if k in C.VERSION_KEYS:
                continue
            owner = _record_owner(k, by_prefix)
            if owner is None:
                raise ModelLoadError(f"{f.path}: tensor {k!r} belongs to no layer record (no {suffix} tag); "
                                     "the shard is not a UQFF file this build can read")
            by_prefix[owner].append(k)
        for prefix, names in by_prefix.items():
            if prefix in self.records:
                raise ModelLoadError(f"{f.path}: layer {prefix!r} is also in {self.records[prefix][0].path.name}; "
                                     "pass each shard set once")
            self.records[prefix] = (f, names)

    def entries(self, key: str, *, small_only: bool = False) -> dict[str, Any]:
        """A record's {suffix: tensor} (the format tag included)."""
        f, names = self.records[key]
        out = {}
        for name in names:
            big = small_only and _numel(f.shapes[name]) > _SMALL
            out[name[len(key) + 1:]] = _ShapeOnly(f.shapes[name]) if big else f.get(name)
        return out

    def tag(self, key: str) -> int:
        f, _names = self.records[key]
        return int(f.get(f"{key}.{FORMAT}").item())

    def where(self, key: str) -> Path:
        return self.records[key][0].path

    def close(self) -> None:
        for f in self.files:
            f.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _record_owner(name: str, prefixes: dict[str, list[str]]) -> str | None:
    for end in (".weight", ".bias"):
        i = name.find(end)
        while i != -1:
            if name[:i] in prefixes and (name[i:] == end or (end == ".weight" and name[i + len(end)] == ".")):
                return name[:i]
            i = name.find(end, i + 1)
    return None


# ------------------------------------------------------------------------------------ model


class _Plan:
    """What each record does in the model: which layer takes it, with which method."""

    def __init__(self) -> None:
        self.direct: dict[str, str] = {}  # layer / embedding name -> record key
        self.split: dict[str, list[str]] = {}  # stacked record key -> per-expert layer names
        self.classes: dict[str, Any] = {}  # record key -> the family's method class
        self.floats: set[str] = set()  # record keys holding a float weight


def _family_class(registry: Any, tag: int, key: str, where: Path) -> Any:
    from mistralrs.specs import resolve

    specs = registry.quantizers_for_uqff_format(tag)
    if not specs:
        raise ModelLoadError(f"{where}: layer {key!r} has UQFF format record {tag}, which no installed quantizer "
                             "reads; install the quantizer plugin for it or write the file again")
    return resolve(specs[0].method)


def _assign(model: Any, uq: UqffSet, registry: Any, dtype: Any) -> _Plan:
    import torch

    from mistralrs.loading import _cast_floating_params
    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import Linear
    from mistralrs.nn.moe import SparseMoE
    from mistralrs.nn.quantized import QuantizedTableLoader
    from mistralrs.quantization import find_quantizer, make_method

    plan = _Plan()
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Embedding)):
            layers[name] = module
    for name, module in model.named_modules():
        if isinstance(module, SparseMoE):
            for stacked, names in module.stacked_expert_keys():
                key = f"{name}.{stacked}"
                if key in uq.records:
                    plan.split[key] = [f"{name}.{n}" for n in names]
    for key in uq.records:
        if key in plan.split:
            continue
        if key not in layers:
            raise ModelLoadError(
                f"{uq.where(key)}: layer {key!r} is not in this model; the UQFF file was written for another model "
                "(check -m / config.json against the file)"
            )
        plan.direct[key] = key

    def method_for(key: str) -> Any:
        tag = uq.tag(key)
        if tag == C.UNQUANT:
            return None
        cls = plan.classes.get(key) or _family_class(registry, tag, key, uq.where(key))
        plan.classes[key] = cls
        try:
            qtype = cls.uqff_qtype(uq.entries(key, small_only=True))
        except ValueError as exc:
            raise ModelLoadError(f"{uq.where(key)}: layer {key!r}: {exc}; the file is damaged or not a UQFF "
                                 "this build reads") from None
        if qtype is None:
            plan.floats.add(key)
            return None
        spec = find_quantizer(qtype, registry)
        if spec is None:
            raise ModelLoadError(f"{uq.where(key)}: layer {key!r} holds {qtype}, which no installed quantizer stores")
        return make_method(spec)

    with torch.device("meta"):
        for key in plan.direct:
            module = layers[key]
            method = method_for(key)
            if method is None:
                continue
            if isinstance(module, Embedding):
                if not callable(getattr(method, "dequantize_rows", None)):
                    raise ModelLoadError(f"{uq.where(key)}: token embedding {key!r} is stored as {method.qtype}, "
                                         "which cannot look rows up; write the file again with another type")
                setattr(module.weight, "weight_loader", QuantizedTableLoader(module, method))  # noqa: B010
            else:
                module.set_quant_method(method)
        for key, names in plan.split.items():
            first = method_for(key)
            for name in names:
                module = layers.get(name)
                if not isinstance(module, Linear):
                    raise ModelLoadError(f"{uq.where(key)}: stacked experts {key!r} do not match this model's {name!r}")
                if first is not None:
                    module.set_quant_method(make_method(find_quantizer(first.qtype, registry)))
        _cast_floating_params(model, dtype)
    return plan


class _ShapeOnly:
    """Stands for a record's big entries while its type is chosen (only their shapes are known)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)


def _stream(uq: UqffSet, plan: _Plan) -> Iterator[tuple[Path, str, tuple[int, ...], Callable[[], Any]]]:
    from mistralrs.nn.quantized import UqffRecord

    assert uq.residual is not None
    residual = _Mapped(uq.residual, "residual")
    for key in residual.keys:
        yield uq.residual, key, residual.shapes[key], _constant(residual.get(key))
    residual.close()

    def value(key: str, entries: dict[str, Any], layer_shape: tuple[int, ...] | None) -> Any:
        if key in plan.floats:
            return plan.classes[key].uqff_float_weight(entries)
        if "weight" in entries and key not in plan.classes:  # unquantized record (family 1)
            return entries["weight"]
        return UqffRecord(entries, layer_shape or ())

    for key in plan.direct:
        path = uq.where(key)
        entries = uq.entries(key)
        entries.pop(FORMAT, None)
        bias = entries.pop("bias", None)
        v = value(key, entries, None)
        yield path, f"{key}.weight", tuple(v.shape), _constant(v)
        if bias is not None:
            yield path, f"{key}.bias", tuple(bias.shape), _constant(bias)
        del entries, v
    for key, names in plan.split.items():
        path = uq.where(key)
        entries = uq.entries(key)
        entries.pop(FORMAT, None)
        if key in plan.classes:
            try:
                parts = plan.classes[key].uqff_split(entries, len(names))
            except ValueError as exc:
                raise ModelLoadError(f"{path}: stacked experts {key!r}: {exc}") from None
        else:
            w = entries["weight"]
            if w.shape[0] != len(names):
                raise ModelLoadError(f"{path}: stacked experts {key!r} hold {w.shape[0]} experts, the model has "
                                     f"{len(names)}; the UQFF file was written for another model")
            parts = [{"weight": w[i]} for i in range(len(names))]
        for name, part in zip(names, parts):
            v = value(key, part, None)
            yield path, f"{name}.weight", tuple(v.shape), _constant(v)
        del entries, parts


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def load_uqff(
    files: Any,
    *,
    config_dir: Path | None = None,
    arch: str | None = None,
    dtype: Any = "auto",
    device: Any = "cpu",
    registry: Any = None,
) -> Any:
    """Load UQFF shard file(s) (already resolved paths) into a ready-to-run `LoadedModel`;
    config.json from `config_dir` (default: the shards' directory)."""
    import torch

    from mistralrs.dtypes import resolve_dtype
    from mistralrs.loading import (
        LoadContext,
        LoadedModel,
        build_model,
        finish_loading,
        load_tensor_stream,
        materialize,
        read_config,
        resident_weight_bytes,
        select_architecture,
    )

    t0 = time.perf_counter()
    paths = [Path(p) for p in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    root = Path(config_dir) if config_dir is not None else paths[0].parent
    config_path = root / "config.json"
    if not config_path.is_file() and (paths[0].parent / "config.json").is_file():
        config_path = paths[0].parent / "config.json"
    config = read_config(config_path)
    spec = select_architecture(config, arch, registry, config_path=config_path)
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    uq = UqffSet.open(paths)
    try:
        ctx = LoadContext(config=config, dtype=torch_dtype, device=dev, registry=registry, arch=spec, model_dir=root)
        model = build_model(spec, config, ctx)
        plan = _assign(model, uq, registry, torch_dtype)
        materialize(model, dev)
        nbytes = load_tensor_stream(model, _stream(uq, plan), where=f"{paths[0]} and {C.RESIDUAL}",
                                    arch_name=spec.name, action="loading UQFF", adopt=True)
        finish_loading(model, None)
    finally:
        uq.close()
    assert uq.residual is not None
    return LoadedModel(
        model=model, config=config, arch=spec, dtype=torch_dtype, device=dev, model_dir=root,
        weight_files=(*paths, uq.residual), load_seconds=time.perf_counter() - t0,
        weight_bytes=resident_weight_bytes(model) or nbytes,
    )
