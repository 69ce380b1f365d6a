"""config.json -> architecture spec -> model built on the meta device -> weights streamed in.

    load_model(path_or_model_files, arch=None, dtype="auto", device="cpu") -> LoadedModel

Steps: read config.json; select the architecture through the registry (``arch`` override by spec
name or HF architecture name, else ``architectures[0]``, else ``model_type``); build the model
on the meta device (no memory), cast its floating parameters to the dtype, let a quantizer
swap linear methods (``LoadContext.quant_method_for``), materialise with ``to_empty``; stream
the safetensors tensors in one at a time (mmap, re-opened every `_MMAP_WINDOW` bytes so the
mapped pages never pile up in RSS; ``MISTRALRS_NO_MMAP=1`` reads each file's bytes instead);
check shapes, missing and unexpected tensors; run ``process_after_loading`` on every linear
method. ``dummy_weights=True`` needs only config.json and fills deterministic random values.

Errors are one-line `ModelLoadError`s naming the file / key / tensor and the fix.

Also here until the engine exists: `build_attention_backend` and `generate_greedy` (a
single-sequence greedy loop over the KV cache, used by parity tests and the CLI).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs

from mistralrs.errors import MistralRsError, ModelLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mistralrs.specs import ArchitectureSpec

# Bytes read through one safetensors mmap before it is closed and re-opened (bounds the RSS
# that mapped checkpoint pages add on top of the weights themselves).
_MMAP_WINDOW = 16 * 1024 * 1024

# Checkpoint tensors that no model needs, whatever the architecture (HF's saved rotary tables).
IGNORABLE_CHECKPOINT_KEYS: tuple[str, ...] = (
    r"(^|\.)rotary_emb\.inv_freq$",
    r"(^|\.)rotary_emb\.original_inv_freq$",
    r"(^|\.)rotary_emb\._cos_cached$",
    r"(^|\.)rotary_emb\._sin_cached$",
)


@attrs.define(kw_only=True)
class LoadContext:
    """What a model class receives besides its config: ``Model(config, ctx)``.

    quant_method_for(name, layer) -> a linear method or None: called for every `Linear` after
    the (meta-device) build, before the weights are read; a quantizer plugin decides there."""

    config: dict
    dtype: Any  # torch.dtype
    device: Any  # torch.device
    registry: Any = None
    arch: Any = None  # ArchitectureSpec
    model_dir: Path | None = None
    quant_method_for: Callable[[str, Any], Any] | None = None
    # tensor parallelism (`distributed.sharding.TensorParallel`): `shard(model)` on the meta model
    # before quantizers choose (they see the shard shapes), `tag(model)` after (which slice of each
    # checkpoint tensor a parameter takes: its ``tp_select`` / ``tp_full_shape`` attributes)
    tensor_parallel: Any = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class LoadedModel:
    model: Any
    config: dict
    arch: Any  # ArchitectureSpec
    dtype: Any
    device: Any
    model_dir: Path | None
    weight_files: tuple[Path, ...] = ()
    dummy_weights: bool = False
    load_seconds: float = 0.0
    weight_bytes: int = 0
    gguf: Any = None  # the parsed GGUF file(s) of a GGUF model (its tokenizer, chat template)

    def kv_cache_shape(self) -> dict[str, int]:
        return self.model.kv_cache_shape()


# --------------------------------------------------------------------------------- files


def _short(path: Path | str) -> str:
    return str(path)


def read_config(path: Path) -> dict:
    """Parse config.json; missing / malformed -> one-line ModelLoadError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{_short(path)}: config.json not found; the model directory must contain the HF config.json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{_short(path)}: cannot read config.json ({exc}); check the file") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{_short(path)} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg}); fix or re-download config.json"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{_short(path)}: config.json must hold a JSON object, not {type(config).__name__}")
    return config


def _resolve_source(source: Any) -> tuple[Path, Path, list[Path]]:
    """(model_dir, config path, weight files) for a directory path or a hub.ModelFiles-like object."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser()
        if not root.exists():
            raise ModelLoadError(f"{_short(root)}: model directory does not exist; pass a local model directory or a hub model id")
        if root.is_file():
            raise ModelLoadError(f"{_short(root)}: expected a model directory (with config.json), got a file")
        return root, root / "config.json", []
    source_root = getattr(source, "root", None)
    if source_root is None:
        raise ModelLoadError(f"cannot load a model from {type(source).__name__}: pass a directory path or hub.ModelFiles")
    root = Path(source_root)
    config = getattr(source, "config", None)
    weights = [Path(w) for w in (getattr(source, "weights", None) or ())]
    return root, Path(config) if config else root / "config.json", weights


def find_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards of model.safetensors.index.json,
    else model.safetensors, else every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, OSError) as exc:
            raise ModelLoadError(
                f"{_short(index)}: malformed index ({type(exc).__name__}: {exc}); it needs a 'weight_map' object"
            ) from None
        files: list[Path] = []
        for name in weight_map.values():
            p = model_dir / name
            if p not in files:
                files.append(p)
        for p in files:
            if not p.is_file():
                raise ModelLoadError(f"{_short(p)}: shard listed in {index.name} is missing; re-download the model")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        non_consolidated = [p for p in found if not p.name.startswith("consolidated")]
        return non_consolidated or found
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    if pickles:
        raise ModelLoadError(
            f"{_short(model_dir)}: only pickle weights ({', '.join(pickles[:3])}); mistralrs loads safetensors only - "
            "convert them (e.g. transformers save_pretrained(safe_serialization=True))"
        )
    raise ModelLoadError(
        f"{_short(model_dir)}: no *.safetensors weights found; download the weights or use dummy_weights=True"
    )


# ------------------------------------------------------------------------- architecture


def select_architecture(config: dict, arch: str | None = None, registry: Any = None, *,
                        config_path: Path | str = "config.json", kind: str | None = None) -> ArchitectureSpec:
    """The registered architecture for a config (or an explicit `arch`: spec name, HF
    architecture name or model_type). `kind` ("embedding"): only architectures of that kind;
    None: embedding architectures only when no other serves the config."""
    from mistralrs.errors import NotFoundError

    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    if arch:
        if arch in registry.architectures:
            return registry.architectures.get(arch)
        try:
            return registry.architecture_for(hf_architecture=arch, model_type=arch, kind=kind)
        except NotFoundError as exc:
            raise ModelLoadError(f"--arch {arch!r}: {exc}") from None
    archs = config.get("architectures")
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if not hf_arch and not model_type:
        raise ModelLoadError(
            f"{_short(config_path)}: neither 'architectures' nor 'model_type' is set; add one or choose an architecture "
            f"with --arch (supported: {', '.join(registry.supported_architecture_names())})"
        )
    try:
        return registry.architecture_for(hf_architecture=hf_arch, model_type=model_type, kind=kind)
    except NotFoundError as exc:
        raise ModelLoadError(f"{_short(config_path)}: {exc}") from None


# ------------------------------------------------------------------------------- building


def _cast_floating_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter to `dtype` (unless it sets ``keep_dtype``), keeping shared
    parameters shared and parameter attributes (weight_loader, ...)."""
    from torch import nn

    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            new = done.get(id(p))
            if new is None:
                if p.is_floating_point() and p.dtype != dtype and not getattr(p, "keep_dtype", False):
                    new = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    new.__dict__.update(p.__dict__)
                else:
                    p.requires_grad_(False)
                    new = p
                done[id(p)] = new
            module._parameters[name] = new


def _shared_param_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    groups: dict[int, list[tuple[Any, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((module, name))
    return [g for g in groups.values() if len(g) > 1]


def _to_empty(module: nn.Module, device: Any, recurse: bool = True) -> None:
    """``module.to_empty(device=device)``, without its ``empty_like`` of each meta tensor (a Python
    meta function, ~2 ms a tensor: 0.3 s of a 1B model's load) where a plain ``empty`` does."""
    import torch

    def empty(t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            return torch.empty(t.shape, dtype=t.dtype, device=device)
        return torch.empty_like(t, device=device)

    module._apply(empty, recurse=recurse)


def materialize(model: nn.Module, device: Any, device_of: Callable[[str], Any] | None = None) -> None:
    """Meta tensors -> uninitialised storage on `device` (``to_empty``), or on ``device_of(module
    name)`` per module (a device map, `device_placement.device_of`). Buffers that were real
    before (built with an explicit device) are restored; shared parameters stay shared;
    modules with ``reset_buffers()`` recompute their non-persistent buffers, and modules with
    ``after_materialize()`` may re-lay out their parameters (before any weight is loaded)."""

    real_buffers: dict[str, torch.Tensor] = {
        name: buf for name, buf in model.named_buffers(remove_duplicate=False) if buf is not None and not buf.is_meta
    }
    shared = _shared_param_groups(model)
    # to_empty makes new Parameter objects off the meta device: keep their attributes (weight_loader, ...)
    attributes = {
        (id(module), name): dict(p.__dict__)
        for module in model.modules() for name, p in module._parameters.items() if p is not None and p.__dict__
    }
    if device_of is None:
        _to_empty(model, device)
    else:
        for mod_name, module in model.named_modules(remove_duplicate=False):
            _to_empty(module, device_of(mod_name), recurse=False)
    for module in model.modules():
        for name, p in module._parameters.items():
            extra = attributes.get((id(module), name))
            if p is not None and extra:
                p.__dict__.update(extra)
    if real_buffers:
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for bname in list(module._buffers):
                full = f"{mod_name}.{bname}" if mod_name else bname
                if full in real_buffers:
                    module._buffers[bname] = real_buffers[full].to(device if device_of is None else device_of(mod_name))
    for group in shared:
        first_mod, first_name = group[0]
        p = first_mod._parameters[first_name]
        for mod, name in group[1:]:
            mod._parameters[name] = p
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
        # Modules may re-lay out their (still empty) storage, e.g. GatedMLP's one gate+up tensor.
        relayout = getattr(module, "after_materialize", None)
        if callable(relayout):
            relayout()


def build_model(spec: ArchitectureSpec, config: dict, ctx: LoadContext) -> nn.Module:
    """Construct the architecture's model on the meta device (no memory), cast to the dtype and
    let the quantizer choose per-layer linear methods. Not yet materialised."""
    import torch

    from mistralrs.nn.linear import linear_layers
    from mistralrs.specs import resolve

    try:
        cls = resolve(spec.builder)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(
            f"architecture {spec.name!r}: cannot import its model class {spec.builder!r} ({type(exc).__name__}: {exc}); "
            "reinstall the plugin that provides it"
        ) from exc
    try:
        with torch.device("meta"):
            model = cls(config, ctx)
            if ctx.tensor_parallel is not None:
                ctx.tensor_parallel.shard(model)
            _cast_floating_params(model, ctx.dtype)
            if ctx.quant_method_for is not None:
                # A model may limit ISQ to one module (vision models: their language model; mistral.rs
                # keeps vision towers and projectors in float)
                scope = getattr(model, "isq_scope", "")
                for name, layer in linear_layers(model):
                    if not name.startswith(scope):
                        continue
                    method = ctx.quant_method_for(name, layer)
                    if method is not None:
                        layer.set_quant_method(method)
                _cast_floating_params(model, ctx.dtype)
            if ctx.tensor_parallel is not None:
                ctx.tensor_parallel.tag(model)
    except MistralRsError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"building architecture {spec.name!r} from config.json failed: {type(exc).__name__}: {exc}; "
            "check config.json against the architecture"
        ) from exc
    return model


# -------------------------------------------------------------------------------- weights


def _expected_tensors(model: nn.Module) -> dict[str, Any]:
    """Parameter / persistent-buffer name -> tensor, as the checkpoint names them."""
    return dict(model.state_dict(keep_vars=True))


def _map_name(model: nn.Module, name: str) -> str | None:
    mapper = getattr(model, "map_checkpoint_name", None)
    if mapper is not None:
        mapped = mapper(name)
        if mapped is None:
            return None
        name = mapped
    else:
        for pattern, repl in getattr(model, "checkpoint_name_map", ()):
            name = re.sub(pattern, repl, name)
        for pattern in getattr(model, "ignored_checkpoint_keys", ()):
            if re.search(pattern, name):
                return None
    for pattern in IGNORABLE_CHECKPOINT_KEYS:
        if re.search(pattern, name):
            return None
    renames = getattr(model, "_checkpoint_renames", None)  # pre-quantized tensors named with dots
    return renames.get(name, name) if renames else name


def _split_parts(model: nn.Module, name: str, shape: tuple[int, ...]) -> list[tuple[str, Callable[[Any], Any]]] | None:
    """A model's optional ``split_checkpoint_tensor(name, shape)`` hook, asked only for a (mapped)
    checkpoint name that is no parameter: ``[(parameter name, tensor -> piece), ...]`` when that
    one tensor fills several parameters (a fused ``experts.gate_up_proj [E, 2I, H]`` into per-expert
    linears), else None (the tensor is then unexpected, as without the hook)."""
    splitter = getattr(model, "split_checkpoint_tensor", None)
    if splitter is None:
        return None
    parts = splitter(name, tuple(shape))
    if parts:
        return list(parts)
    # a pre-quantized fused tensor (`CheckpointLinearMethod.fused_suffixes`: GPT-OSS's
    # ``experts.gate_up_proj_blocks [E, 2I, G, 16]``) splits along E and rows as the float one would
    for suffix, buffer in getattr(model, "_checkpoint_fused_suffixes", ()):
        if name.endswith(suffix) and len(shape) >= 3:
            parts = splitter(name[:-len(suffix)], tuple(shape[:3]))
            if parts:
                return [(f"{part.removesuffix('.weight')}.{buffer}", select) for part, select in parts]
    return None


def _corrupt(path: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{_short(path)}: cannot read safetensors file, it is truncated or corrupt ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it and download it again"
    )


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _iter_mmap(path: Path) -> Iterator[tuple[str, tuple[int, ...], Callable[[], Any]]]:
    """(name, shape, read()) per tensor through safe_open, re-opening the file every
    `_MMAP_WINDOW` bytes so mapped pages are released as loading proceeds."""
    from safetensors import safe_open

    def open_() -> Any:
        try:
            return safe_open(str(path), framework="pt", device="cpu").__enter__()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise _corrupt(path, exc) from None

    handle = open_()
    try:
        keys = list(handle.keys())
        read_since_open = 0
        for key in keys:
            try:
                sl = handle.get_slice(key)
                shape = tuple(sl.get_shape())
                itemsize = _ITEMSIZE.get(str(sl.get_dtype()).upper(), 4)
            except Exception as exc:  # noqa: BLE001
                raise _corrupt(path, exc) from None

            def read(_key: str = key, _handle: Any = handle) -> Any:
                try:
                    return _handle.get_tensor(_key)
                except Exception as exc:  # noqa: BLE001
                    raise _corrupt(path, exc) from None

            yield key, shape, read
            read_since_open += math.prod(shape) * itemsize
            if read_since_open >= _MMAP_WINDOW:
                handle.__exit__(None, None, None)
                handle = open_()
                read_since_open = 0
    finally:
        try:
            handle.__exit__(None, None, None)
        except Exception:  # noqa: BLE001
            pass


def _iter_bytes(path: Path) -> Iterator[tuple[str, tuple[int, ...], Callable[[], Any]]]:
    """MISTRALRS_NO_MMAP=1: read the whole file into memory, deserialize, hand tensors out."""
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(path.read_bytes())
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, exc) from None
    for key in list(tensors):
        t = tensors.pop(key)
        yield key, tuple(t.shape), cast("Callable[[], Any]", lambda _t=t: _t)
        del t


def _no_mmap() -> bool:
    return os.environ.get("MISTRALRS_NO_MMAP", "").strip().lower() in ("1", "true", "yes", "on")


def load_weights(model: nn.Module, files: Iterable[Path], *, arch_name: str = "model",
                 action: str = "loading") -> int:
    """Stream every tensor of the safetensors `files` into the model's (materialised) parameters;
    returns the number of bytes copied. Shape mismatch / missing / unexpected tensors -> ModelLoadError."""
    files = [Path(f) for f in files]
    iterate = _iter_bytes if _no_mmap() else _iter_mmap

    def stream() -> Iterator[tuple[Path, str, tuple[int, ...], Callable[[], Any]]]:
        for path in files:
            if not path.is_file():
                raise ModelLoadError(f"{_short(path)}: weights file not found; re-download the model")
            for key, shape, read in iterate(path):
                yield path, key, shape, read

    where = files[0].name if len(files) == 1 else f"{len(files)} files in {files[0].parent}" if files else "no files"
    return load_tensor_stream(model, stream(), where=where, arch_name=arch_name, action=action)


def load_tensor_stream(model: nn.Module, tensors: Iterable[tuple[Path, str, tuple[int, ...], Callable[[], Any]]], *,
                       where: str, arch_name: str = "model", action: str = "loading", adopt: bool = False) -> int:
    """Fill the model's (materialised) parameters from ``(file, checkpoint name, shape, read())``
    items (safetensors, or a GGUF file's tensors under their HF names); returns the bytes filled.
    A parameter with a ``weight_loader`` takes the value itself (ISQ quantizes it, a GGUF block
    tensor is installed as it is); else shapes must match. Missing / unexpected tensors and shape
    mismatches are one-line `ModelLoadError`s naming the file. With `adopt`, a tensor of the
    parameter's dtype becomes its storage instead of being copied (the tensors are views of a
    copy-on-write mapping that outlives the load: UQFF files)."""
    import torch

    expected = _expected_tensors(model)
    filled: set[str] = set()
    nbytes = 0
    from mistralrs.progress import progress

    with torch.no_grad(), progress(len(expected), f"{action} {arch_name} weights") as bar:
        for path, key, shape, read in tensors:
            target = _map_name(model, key)
            if target is None:
                continue
            dest = expected.get(target)
            parts = _split_parts(model, target, shape) if dest is None else None
            if parts is not None:
                # one checkpoint tensor feeding several parameters (e.g. fused MoE experts)
                tensor = read()
                for part_name, select in parts:
                    part_dest, value = expected.get(part_name), select(tensor)
                    part_loader = getattr(part_dest, "weight_loader", None)
                    if part_dest is None or (part_loader is None and _full_shape(part_dest) != tuple(value.shape)):
                        raise ModelLoadError(
                            f"{_short(path)}: tensor {key!r} splits into {part_name!r} of shape "
                            f"{list(value.shape)}, which {arch_name} does not have; config.json does not match "
                            "the weights"
                        )
                    value = _shard_of(part_dest, value)
                    part_loader(part_dest, value) if part_loader is not None else part_dest.copy_(value)
                    nbytes += part_dest.numel() * part_dest.element_size()
                    filled.add(part_name)
                del tensor
                continue
            if dest is None:
                raise ModelLoadError(
                    f"{_short(path)}: unexpected tensor {key!r} (no such parameter in {arch_name}); the checkpoint "
                    "does not match config.json or the architecture - check 'architectures' / --arch"
                )
            loader = getattr(dest, "weight_loader", None)
            if loader is None and _full_shape(dest) != shape:
                raise ModelLoadError(
                    f"{_short(path)}: tensor {key!r} has shape {list(shape)} but {arch_name} expects "
                    f"{list(dest.shape)}; config.json does not match the weights"
                )
            tensor = _shard_of(dest, read())
            bar.update()
            if loader is not None:
                loader(dest, tensor)
            elif adopt and tensor.dtype == dest.dtype and tensor.device == dest.device and _owns_storage(dest):
                dest.data = tensor
            else:
                dest.copy_(tensor)
            nbytes += dest.numel() * dest.element_size()
            filled.add(target)
            del tensor
    # Names that alias one tensor (tied parameters) are filled by any one of them.
    filled_ids = {id(expected[name]) for name in filled}
    missing = [name for name, t in expected.items() if name not in filled and id(t) not in filled_ids]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{where}: tensor {missing[0]!r}{more} required by {arch_name} is missing from the checkpoint; "
            "the weights are incomplete or belong to another architecture"
        )
    return nbytes


def _full_shape(param: Any) -> tuple[int, ...]:
    """The checkpoint shape a parameter takes: its own, or the whole tensor it is a shard of."""
    return tuple(getattr(param, "tp_full_shape", None) or param.shape)


def _shard_of(param: Any, tensor: Any) -> Any:
    """A tensor-parallel parameter's slice of a checkpoint tensor (``tp_select``); else the tensor."""
    select = getattr(param, "tp_select", None)
    return select(tensor) if select is not None else tensor


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether `t` is all of its storage (not a view into a fused parameter, e.g. GatedMLP's gate+up)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def init_dummy_weights(model: nn.Module, seed: int = 0, *, action: str | None = None) -> int:
    """Deterministic stand-in weights: normal(0, 0.02) everywhere, norms' weights 1 (0 for the
    ``1 + w`` Gemma variant) and their biases 0. Returns the bytes filled."""
    import torch

    from mistralrs.nn.norm import LayerNorm, RMSNorm
    from mistralrs.progress import no_progress, progress

    gen = torch.Generator(device="cpu").manual_seed(seed)
    nbytes = 0
    modules = list(model.modules())
    bar = progress(len(modules), f"{action} dummy weights") if action else no_progress()
    with torch.no_grad(), bar:
        for module in modules:
            bar.update()
            for pname, p in list(module.named_parameters(recurse=False)):
                if p is None:
                    continue
                loader = getattr(p, "weight_loader", None)
                if loader is not None and p.is_floating_point():
                    # e.g. ISQ: the loader quantizes; give it the values the plain model would get
                    value = torch.empty(_full_shape(p), dtype=p.dtype)
                    _fill_normal(value.view(-1), gen)
                    loader(p, _shard_of(p, value))
                    nbytes += p.numel() * p.element_size()
                    continue
                if getattr(p, "tp_select", None) is not None and p.is_floating_point():
                    # a tensor-parallel shard: draw the whole tensor, as one process would, keep the slice
                    value = torch.empty(_full_shape(p), dtype=p.dtype)
                    if isinstance(module, (RMSNorm, LayerNorm)) or "norm" in type(module).__name__.lower():
                        value.fill_(0.0 if (pname == "bias" or getattr(module, "add_unit_offset", False)) else 1.0)
                    else:
                        _fill_normal(value.view(-1), gen)
                    p.copy_(_shard_of(p, value))
                    nbytes += p.numel() * p.element_size()
                    continue
                if isinstance(module, (RMSNorm, LayerNorm)) or "norm" in type(module).__name__.lower():
                    p.fill_(0.0 if (pname == "bias" or getattr(module, "add_unit_offset", False)) else 1.0)
                elif p.is_floating_point():
                    # chunked so a huge embedding never needs a second full-size fp32 copy
                    if p.is_contiguous():
                        _fill_normal(p.view(-1), gen)
                    else:
                        p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=gen))
                else:
                    p.zero_()
                nbytes += p.numel() * p.element_size()
    return nbytes


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as loaded (quantized state included; shared storage once)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _fill_normal(flat: torch.Tensor, gen: Any) -> None:
    """normal(0, 0.02) in 4M-element chunks, so a huge tensor never needs a full fp32 copy."""
    import torch

    step = 1 << 22
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n].copy_(torch.empty(n).normal_(0.0, 0.02, generator=gen))


def assign_checkpoint_methods(model: Any, found: tuple[Any, dict], names: dict[str, tuple[int, ...]] | set[str],
                              dtype: Any) -> int:
    """Give every `Linear` whose packed tensors the checkpoint holds the format's method (on the
    meta device, before materialising); returns how many layers got it. `names`: the checkpoint's
    tensors with their shapes (fused expert tensors are split by shape; a bare set of names
    cannot be)."""
    import torch

    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import Linear, linear_layers
    from mistralrs.specs import resolve

    spec, qc = found
    cls = resolve(spec.method)
    layers: dict[str, Any] = dict(linear_layers(model))
    # token tables stored quantized (mlx_lm quantizes embeddings): they become the embedding's quantized table
    layers.update((n, m) for n, m in model.named_modules() if isinstance(m, Embedding) and m.weight is not None)
    fused = tuple(getattr(cls, "fused_suffixes", ()))
    if fused:
        model._checkpoint_fused_suffixes = fused
    by_layer: dict[str, set[str]] = {}
    for key in names:
        mapped = _map_name(model, key) or key
        shape = names.get(key) if isinstance(names, dict) else None
        parts = _split_parts(model, mapped, shape) if fused and shape is not None and mapped not in layers else None
        for part, _select in parts or ():
            layer_name, _, suffix = part.rpartition(".")
            if layer_name in layers:
                by_layer.setdefault(layer_name, set()).add(suffix)
        cut = mapped.rfind(".")
        while cut > 0:  # the longest prefix that is a layer: suffixes may have dots (BNB's weight.absmax)
            if mapped[:cut] in layers:
                by_layer.setdefault(mapped[:cut], set()).add(mapped[cut + 1:])
                break
            cut = mapped.rfind(".", 0, cut)
    try:
        marker = cls(qtype=spec.name, quant_config=qc).marker  # a factory may pick the class from the config
    except ValueError as exc:
        raise ModelLoadError(f"{spec.name} checkpoint: {exc}; config.json's quantization_config is not supported") from None
    renames: dict[str, str] = {}
    count = 0
    with torch.device("meta"):
        for name, layer in layers.items():
            present = by_layer.get(name, set())
            if marker not in present:
                continue
            try:
                method = cls(qtype=spec.name, quant_config=qc)
                method.present = frozenset(present)
                owner = name
                if isinstance(layer, Embedding):
                    if not callable(getattr(method, "dequantize_rows", None)):
                        raise ValueError(f"a {spec.name} token table cannot look rows up")
                    table = Linear(layer.embedding_dim, layer.num_embeddings, quant_method=method)
                    layer.set_quantized_head(table)
                    owner = f"{name}.quantized_head"
                for suffix in present:  # a buffer name cannot hold a dot
                    target = f"{owner}.{suffix.replace('.', '__')}"
                    if target != f"{name}.{suffix}":
                        renames[f"{name}.{suffix}"] = target
                if not isinstance(layer, Embedding):
                    layer.set_quant_method(method)
            except ValueError as exc:
                raise ModelLoadError(f"layer {name!r}: {exc}; config.json's quantization_config does not match "
                                     "the checkpoint") from None
            count += 1
        _cast_floating_params(model, dtype)
    if renames:
        model._checkpoint_renames = renames
    if count == 0:
        raise ModelLoadError(f"config.json says the weights are {spec.name} (quantization_config), but no layer of the "
                             f"checkpoint has a {marker!r} tensor; the checkpoint does not match its config")
    return count


def _process_after_loading(model: nn.Module) -> None:
    from mistralrs.nn.linear import Linear
    from mistralrs.nn.quantized import CheckpointLinearMethod

    for name, module in model.named_modules():
        if isinstance(module, Linear):
            try:
                module.process_after_loading()
            except ValueError as exc:  # a checkpoint layer whose tensors do not fit together
                if not isinstance(module.quant_method, CheckpointLinearMethod):
                    raise
                raise ModelLoadError(f"layer {name.removesuffix('.quantized_head')!r}: {exc}; the checkpoint does not "
                                     "match its quantization_config") from None


def finish_loading(model: nn.Module, quant_method_for: Callable[[str, Any], Any] | None) -> None:
    """After every tensor is in: methods' post-processing (ISQ of dummy weights), the tied head's
    quantization, modules' ``after_loading`` hooks (fusing quantized projections that share an
    input: GatedMLP, Attention), eval mode."""
    _process_after_loading(model)
    if quant_method_for is not None:
        from mistralrs.requantize import quantize_tied_head

        quantize_tied_head(model, quant_method_for)
    for module in model.modules():
        after_loading = getattr(module, "after_loading", None)
        if callable(after_loading):
            after_loading()
    model.eval()


# ------------------------------------------------------------------------------- load_model


def place_on_meta(model: nn.Module, device_map: Any) -> tuple[Any, Callable[[str], Any] | None]:
    """The device map's placement for a meta-device model (None when trivial: one device) and its
    module -> device function for `materialize`; layers of the plan's fp32 groups are cast here."""
    if device_map is None:
        return None, None
    placement = device_map(model) if callable(device_map) else device_map
    if placement is None or placement.trivial:
        return None, None
    import torch

    from mistralrs.device_placement import decoder_layers, device_of, float32_layers

    for layer in float32_layers(model, placement):
        _cast_floating_params(layer, torch.float32)
    return placement, device_of(placement, decoder_layers(model))



def load_model(
    source: Any,
    *,
    arch: str | None = None,
    dtype: Any = "auto",
    device: Any = "cpu",
    dummy_weights: bool = False,
    registry: Any = None,
    quant_method_for: Callable[[str, Any], Any] | None = None,
    seed: int = 0,
    kind: str | None = None,
    device_map: Any = None,
    tensor_parallel: Any = None,
) -> LoadedModel:
    """Load a model directory (or hub.ModelFiles) into a ready-to-run model. See the module doc.

    `device_map`: a `device_map.Placement`, or ``f(meta model) -> Placement | None`` (the automatic
    fit needs the built model's sizes). `tensor_parallel`: this rank's
    `distributed.sharding.TensorParallel`."""
    import torch

    from mistralrs.dtypes import resolve_dtype

    t0 = time.perf_counter()
    root, config_path, weight_files = _resolve_source(source)
    config = read_config(config_path)
    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    spec = select_architecture(config, arch, registry, config_path=config_path, kind=kind)
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if not dummy_weights and not weight_files:
        weight_files = find_weight_files(root)
    from mistralrs.prequantized import checkpoint_format, checkpoint_names

    prequantized = checkpoint_format(config, registry, config_path)
    isq_after = None
    if prequantized is not None:
        if dummy_weights:
            raise ModelLoadError(f"{config_path}: a pre-quantized checkpoint ({prequantized[0].name}) has no "
                                 "dummy-weight mode; load its weights")
        # --isq on a pre-quantized checkpoint: load as published, then re-quantize (dequantized) in place
        isq_after, quant_method_for = quant_method_for, None
    if tensor_parallel is not None and prequantized is not None:
        raise ModelLoadError(f"{config_path}: tensor parallelism splits float checkpoints (and --isq); a "
                             f"pre-quantized {prequantized[0].name} checkpoint cannot be split yet - use -tp 1")
    ctx = LoadContext(config=config, dtype=torch_dtype, device=dev, registry=registry, arch=spec,
                      model_dir=root, quant_method_for=quant_method_for, tensor_parallel=tensor_parallel)
    model = build_model(spec, config, ctx)
    if prequantized is not None:
        assign_checkpoint_methods(model, prequantized, checkpoint_names(weight_files), torch_dtype)
    placement, device_of = place_on_meta(model, device_map)
    materialize(model, dev, device_of)
    if dummy_weights:
        nbytes = init_dummy_weights(model, seed, action="quantizing" if quant_method_for is not None else None)
        weight_files = []
    else:
        nbytes = load_weights(model, weight_files, arch_name=spec.name,
                              action="loading and quantizing" if quant_method_for is not None else "loading")
    finish_loading(model, quant_method_for)
    if isq_after is not None:
        from mistralrs.requantize import requantize

        requantize(model, isq_after)
    if placement is not None:
        from mistralrs.device_placement import install

        install(model, placement)
    return LoadedModel(
        model=model, config=config, arch=spec, dtype=torch_dtype, device=dev, model_dir=root,
        weight_files=tuple(weight_files), dummy_weights=dummy_weights,
        load_seconds=time.perf_counter() - t0, weight_bytes=resident_weight_bytes(model) if quant_method_for else nbytes,
    )


# ---------------------------------------------------------------------- attention backend


def _model_of(model: Any) -> Any:
    return model.model if isinstance(model, LoadedModel) else model


def _model_dtype(model: Any) -> Any:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def build_attention_backend(
    model: Any,
    *,
    name: str | None = None,
    num_blocks: int = 0,
    block_size: int = 32,
    dtype: Any = None,
    device: Any = "cpu",
    registry: Any = None,
    num_state_slots: int = 16,
) -> Any:
    """Construct a registered attention backend (by `name`, else the highest-priority one that
    supports the device/dtype/head_dim) for the model's KV-cache shape. num_blocks=0: no cache.
    A model with recurrent layers (``recurrent_state_shape()``) also gets `num_state_slots`
    per-sequence state slots beside the blocks (the engine passes its ``max_seqs``)."""
    import torch

    from mistralrs.dtypes import resolve_dtype

    inner = _model_of(model)
    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    dev = torch.device(device)
    kv = dict(inner.kv_cache_shape())
    placement = getattr(inner, "device_placement", None)
    if placement is not None:
        # a device-mapped model: one backend per group, on its device, for its own layers
        from mistralrs.device_placement import MappedBackend, layer_map

        subs = []
        for g, group_device in enumerate(placement.groups):
            count = len(placement.layers_of(g))
            group_dtype = dtype if dtype is not None else (torch.float32 if g in placement.float32_groups
                                                           else _model_dtype(inner))
            subs.append(_backend_for(registry, name, {**kv, "num_layers": count}, num_blocks, block_size,
                                     resolve_dtype(group_dtype, torch.device(group_device)),
                                     torch.device(group_device)))
        # recurrent states (hybrid models) stay with the mapped backend itself, on the first group's device
        recurrent = _recurrent_shape(inner, num_state_slots if num_blocks else 0, torch.device(placement.groups[0]))
        return MappedBackend(subs, layer_map(placement), recurrent=recurrent)
    cache_dtype = resolve_dtype(dtype, dev) if dtype is not None else _model_dtype(inner)
    return _backend_for(registry, name, kv, num_blocks, block_size, cache_dtype, dev,
                        recurrent=_recurrent_shape(inner, num_state_slots if num_blocks else 0, dev))


def _recurrent_shape(inner: Any, num_slots: int, dev: Any) -> Any:
    """The recurrent-state slots of a model with recurrent layers (``recurrent_state_shape()``), else None."""
    rec_spec = inner.recurrent_state_shape() if hasattr(inner, "recurrent_state_shape") else None
    if not rec_spec:
        return None
    from mistralrs.state_cache import RecurrentStateShape

    # states keep the model's dtype (an fp8 KV cache does not make fp8 states)
    return RecurrentStateShape.from_model(rec_spec, num_slots=num_slots, dtype=_model_dtype(inner), device=dev)


def _backend_for(registry: Any, name: str | None, kv: dict[str, Any], num_blocks: int, block_size: int,
                 cache_dtype: Any, dev: Any, recurrent: Any = None) -> Any:
    from mistralrs.attention import KVCacheShape
    from mistralrs.specs import resolve

    if name:
        spec = registry.attention_backends.get(name)
    else:
        spec = registry.attention_backends.select(
            device=dev.type, dtype=str(cache_dtype).removeprefix("torch."), head_dim=kv["head_dim"],
        )
    cls = resolve(spec.backend)
    shape = KVCacheShape(
        num_layers=kv["num_layers"], num_kv_heads=kv["num_kv_heads"], head_dim=kv["head_dim"],
        v_head_dim=kv.get("v_head_dim"), v_from_k=bool(kv.get("v_from_k", False)),
        num_blocks=num_blocks, block_size=block_size,
        dtype=cache_dtype, device=dev, recurrent=recurrent,
    )
    return cls(shape)


# ------------------------------------------------------------------------ greedy generation


def generate_greedy(
    loaded: Any,
    backend: Any,
    input_ids: list[int],
    max_new_tokens: int,
    *,
    eos_token_ids: Iterable[int] | None = None,
) -> list[int]:
    """Greedy decoding of one sequence; returns the new tokens only (stops early at an eos).

    With a cache (``backend.num_blocks > 0``): one prefill step, then one token per step,
    blocks 0..n-1 in order. Without a cache: the whole sequence is recomputed each step."""
    import torch

    model = _model_of(loaded)
    if not input_ids:
        raise ValueError("generate_greedy needs at least one input token")
    device = next(iter(model.parameters())).device
    eos = set(eos_token_ids or ())
    tokens = list(input_ids)
    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    cached = backend.num_blocks > 0
    bs = backend.block_size
    block_table = None
    if cached:
        needed = -(-(len(tokens) + max_new_tokens) // bs)
        if needed > backend.num_blocks:
            raise ValueError(
                f"the KV cache has {backend.num_blocks} blocks of {bs} tokens; {len(tokens) + max_new_tokens} tokens need {needed}"
            )
        block_table = torch.arange(needed, dtype=torch.int32, device=device)[None, :]

    # a model with recurrent layers keeps this sequence's state in slot 0
    state_slots = torch.zeros(1, dtype=torch.int64, device=device) if getattr(backend, "states", None) else None

    def slots(pos: torch.Tensor) -> torch.Tensor:
        assert block_table is not None  # only called when cached
        return block_table[0, pos // bs].long() * bs + pos % bs

    with torch.no_grad():
        done = 0  # tokens whose K/V are in the cache
        while len(out) < max_new_tokens:
            if cached:
                new = tokens[done:]
                pos = torch.arange(done, len(tokens), dtype=torch.int64, device=device)
                batch = backend.batch([0, len(new)], [len(tokens)], slot_mapping=slots(pos), block_tables=block_table,
                                      state_slots=state_slots)
                ids = torch.tensor(new, dtype=torch.int64, device=device)
            else:
                pos = torch.arange(len(tokens), dtype=torch.int64, device=device)
                batch = backend.batch([0, len(tokens)], [len(tokens)])
                ids = torch.tensor(tokens, dtype=torch.int64, device=device)
            hidden = model(ids, pos, batch)
            logits = model.compute_logits(hidden[-1:])
            nxt = int(torch.argmax(logits[0]).item())
            done = len(tokens)
            tokens.append(nxt)
            out.append(nxt)
            if nxt in eos:
                break
    return out
