"""Writing a quantized model as UQFF (``mistralrs quantize``, ``Which.Plain(write_uqff=...)``).

    output = plan_output("out/", ["q4k", "q8_0"])        # directory mode: q4k-0.uqff, q8_0-0.uqff
    report = write_shards(loaded.model, output.directory, "q4k", quant="q4k", targeted=plan.targets)
    write_metadata(loaded.model, output.directory, source_root, outputs=[report])

The model is the ISQ-loaded one: its layers already hold the quantized state, so writing costs
no more memory than running (the records are the layers' own tensors, written straight from
memory). Per layer (`model_records`):

- a quantized `Linear` is a record of its quantizer's family (``uqff_entries`` plus the
  ``weight.format`` tag of its spec's ``uqff_format``; the ``bias`` in the model dtype);
- a token embedding whose table was quantized (a tied LM head) is a record under the
  embedding's key, and its float table is not in the residual (UQFF 1.2);
- the experts of a `SparseMoE` become mistral.rs's stacked ``experts.gate_proj|up_proj|down_proj``
  records when their family stacks (GGML blocks), else one record per expert;
- a float `Linear` that ISQ targeted but could not quantize (a shape fallback, ``moqe``) is an
  unquantized record (family 1); every other tensor goes to ``residual.safetensors``.

Shards are cut at 10 GiB. Names inside the files are the checkpoint's (our module names are
the HF ones).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from mistralrs.errors import ConfigError
from mistralrs.uqff import container as C
from mistralrs.uqff.records import FORMAT

log = logging.getLogger("mistralrs.uqff")


@attrs.define
class LayerRecord:
    key: str
    tensors: dict[str, torch.Tensor]  # full names -> tensors, format tag and bias included
    stored: str  # what the layer holds: a type name, or the float dtype of an unquantized record
    shape: list[int]
    target: str | None = None  # the type ISQ wanted for it (None: not targeted)

    @property
    def nbytes(self) -> int:
        return sum(C.tensor_nbytes(t) for t in self.tensors.values())


@attrs.define
class OutputPlan:
    directory: Path
    stems: dict[str, str]  # type label -> shard stem
    directory_mode: bool


def plan_output(output: str | Path, types: list[str]) -> OutputPlan:
    """Where the shards of each type go: ``-o x.uqff`` writes ``x-0.uqff`` ... beside it (one type
    only); any other ``-o`` is a directory with a shard set named per type (``q4k-0.uqff``)."""
    out = Path(output).expanduser()
    if out.suffix == ".uqff":
        if len(types) != 1:
            raise ConfigError(f"-o {output}: {len(types)} types ({', '.join(types)}) need a directory, not a .uqff file")
        return OutputPlan(out.parent if str(out.parent) else Path("."), {types[0]: out.stem}, False)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {output} is a file; give a directory or a path ending in .uqff")
    return OutputPlan(out, {t: t for t in types}, True)


def _float_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}.get(dtype, str(dtype).removeprefix("torch."))


def _spec_of(method: Any, registry: Any) -> Any:
    from mistralrs.quantization import find_quantizer

    spec = find_quantizer(method.qtype, registry)
    if spec is None or spec.uqff_format is None:
        raise ConfigError(f"quantization type {method.qtype} has no UQFF record format; choose another --isq type")
    return spec


def _record(key: str, layer: Any, registry: Any, target: str | None) -> LayerRecord:
    from mistralrs.nn.quantized import QuantizedLinearMethod

    method = layer.quant_method
    if isinstance(method, QuantizedLinearMethod) and method.is_quantized(layer):
        spec = _spec_of(method, registry)
        tensors = {f"{key}.{FORMAT}": torch.tensor(spec.uqff_format, dtype=torch.uint8)}
        tensors.update({f"{key}.{suffix}": t for suffix, t in method.uqff_entries(layer).items()})
        stored = method.qtype
    else:
        tensors = {f"{key}.{FORMAT}": torch.tensor(C.UNQUANT, dtype=torch.uint8), f"{key}.weight": layer.weight}
        stored = _float_label(layer.weight.dtype)
    if isinstance(layer.bias, torch.Tensor):
        tensors[f"{key}.bias"] = layer.bias
    return LayerRecord(key, tensors, stored, [layer.out_features, layer.in_features], target)


def _stacked(prefix: str, moe: Any, records: dict[str, LayerRecord], registry: Any) -> Iterator[LayerRecord]:
    """mistral.rs's stacked expert records, for the projections whose experts all stack."""
    from mistralrs.specs import resolve

    for stacked_name, names in moe.stacked_expert_keys():
        keys = [f"{prefix}.{n}" for n in names]
        parts = [records.get(k) for k in keys]
        if any(p is None for p in parts):
            continue
        fmt = {int(p.tensors[f"{p.key}.{FORMAT}"]) for p in parts}  # type: ignore[union-attr]
        if len(fmt) != 1 or any(f"{p.key}.bias" in p.tensors for p in parts):  # type: ignore[union-attr]
            continue
        specs = registry.quantizers_for_uqff_format(fmt.pop())
        if not specs:
            continue
        cls = resolve(specs[0].method)
        entries = [{name[len(p.key) + 1:]: t for name, t in p.tensors.items() if name != f"{p.key}.{FORMAT}"}  # type: ignore[union-attr]
                   for p in parts]
        stacked = cls.uqff_stack(entries)
        if stacked is None:
            continue
        key = f"{prefix}.{stacked_name}"
        first = parts[0]
        assert first is not None
        tensors = {f"{key}.{FORMAT}": first.tensors[f"{first.key}.{FORMAT}"]}
        tensors.update({f"{key}.{suffix}": t for suffix, t in stacked.items()})
        stored = {p.stored for p in parts if p is not None}
        for k in keys:
            del records[k]
        yield LayerRecord(key, tensors, stored.pop() if len(stored) == 1 else "mixed",
                          [len(parts), *first.shape], first.target)


def model_records(model: torch.nn.Module, registry: Any,
                  targeted: Callable[[str], str | None] | None = None) -> tuple[list[LayerRecord], set[str]]:
    """The model's layer records in module order, and the state_dict names they hold.
    `targeted(name)`: the type ISQ wanted for a Linear (None: not an ISQ target)."""
    from mistralrs.nn.embedding import Embedding
    from mistralrs.nn.linear import Linear
    from mistralrs.nn.moe import SparseMoE

    targeted = targeted or (lambda _name: None)
    records: dict[str, LayerRecord] = {}
    covered: set[str] = set()
    heads: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, Embedding) and module.quantized_head is not None:
            if module.weight is not None:
                raise ConfigError(f"{name}: its quantized LM head keeps a float table, which UQFF cannot store; "
                                  "choose another --isq type")
            heads.add(f"{name}.quantized_head")
            records[name] = _record(name, module.quantized_head, registry, targeted("lm_head"))
            covered.update(f"{name}.quantized_head.{k}" for k in module.quantized_head.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name in heads:
            continue
        target = targeted(name)
        from mistralrs.nn.quantized import QuantizedLinearMethod

        quantized = isinstance(module.quant_method, QuantizedLinearMethod) and module.quant_method.is_quantized(module)
        if quantized or target is not None:
            records[name] = _record(name, module, registry, target)
            covered.update(f"{name}.{k}" for k in module.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, SparseMoE):
            for rec in list(_stacked(name, module, records, registry)):
                records[rec.key] = rec
    return list(records.values()), covered


def write_shards(model: torch.nn.Module, directory: Path, stem: str, *, quant: str, registry: Any = None,
                 targeted: Callable[[str], str | None] | None = None,
                 max_shard_bytes: int = C.MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write the model's layer records as ``<stem>-0.uqff`` ...; returns the type's report entry
    (``outputs[i]`` of uqff_report.json) with the state_dict names the records hold under
    ``"_covered"``."""
    from mistralrs.progress import progress

    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records, covered = model_records(model, registry, targeted)
    shards: list[str] = []
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> None:
        nonlocal chunk, size
        name = C.shard_name(stem, len(shards))
        C.write_safetensors(directory / name, [*C.version_entries(), *chunk], C.producer_metadata())
        shards.append(name)
        chunk, size = [], 0

    with progress(len(records), f"writing {quant} UQFF") as bar:
        for rec in records:
            if chunk and size + rec.nbytes > max_shard_bytes:
                flush()
            chunk.extend(rec.tensors.items())
            size += rec.nbytes
            bar.update()
    if chunk or not shards:
        flush()
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.stored] = counts.get(rec.stored, 0) + 1
    fallbacks = [{"module": r.key, "from": r.target, "to": r.stored, "shape": r.shape}
                 for r in records if r.target is not None and r.stored != r.target]
    return {
        "quant": quant, "shards": shards, "layers": len(records), "actual_counts": counts,
        "fallback_count": len(fallbacks), "fallbacks": fallbacks,
        "layer_details": [{"module": r.key, "default_target": quant if r.target else None,
                           "resolved_target": r.target, "stored": r.stored, "shape": r.shape} for r in records],
        "_covered": sorted(covered),
    }


def residual_tensors(model: torch.nn.Module, covered: set[str]) -> list[tuple[str, torch.Tensor]]:
    """Every state_dict tensor no record holds, once per storage (tied weights are one tensor)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for name, t in model.state_dict().items():
        if name in covered:
            continue
        ident = (t.data_ptr(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out.append((name, t))
    return out


def _copy_assets(source_root: Path | None, directory: Path) -> list[str]:
    copied: list[str] = []
    if source_root is None:
        return copied
    for name in C.ASSETS:
        src = Path(source_root) / name
        if not src.is_file():
            continue
        dest = directory / name
        if name == "config.json":
            config = json.loads(src.read_text(encoding="utf-8"))
            config.pop("quantization_config", None)  # the UQFF's layers say what they hold
            dest.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        elif src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        copied.append(name)
    return copied


def _model_card(base_model: str | None, outputs: list[dict[str, Any]], directory: Path) -> str:
    name = base_model or directory.name
    rows = "\n".join(f"| `{o['quant']}` | {', '.join(f'`{s}`' for s in o['shards'])} |" for o in outputs)
    first = outputs[0]["shards"][0] if outputs else "q4k-0.uqff"
    return f"""---
tags:
  - uqff
  - mistral.rs
base_model: {name}
base_model_relation: quantized
---

# {name} (UQFF)

UQFF quantizations of [{name}](https://huggingface.co/{name}) for mistral.rs and mistralrs (Python).

| Type | Files |
|---|---|
{rows}

```
mistralrs run -m <this repo> --from-uqff {first}
```
"""


def write_residual(model: torch.nn.Module, directory: Path, source_root: Path | None, covered: set[str]) -> None:
    """``residual.safetensors`` (every tensor no record holds) and the copied assets."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    C.write_safetensors(directory / C.RESIDUAL, residual_tensors(model, covered), C.producer_metadata())
    _copy_assets(source_root, directory)


def write_report(directory: Path, outputs: list[dict[str, Any]], *, base_model: str | None = None,
                 readme: bool = False, tool: str = "mistralrs quantize") -> Path:
    """``uqff_report.json`` and, with `readme`, the README model card. Returns the report's path."""
    from mistralrs import __version__

    directory = Path(directory)
    report = {
        "schema": 1,
        "generated_by": {"tool": tool, "mistralrs_version": __version__},
        "base_model": base_model,
        "uqff_version": ".".join(map(str, C.VERSION)),
        "outputs": [{k: v for k, v in out.items() if not k.startswith("_")} for out in outputs],
    }
    path = directory / C.REPORT
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if readme:
        (directory / "README.md").write_text(_model_card(base_model, outputs, directory), encoding="utf-8")
    return path


def write_metadata(model: torch.nn.Module, directory: Path, source_root: Path | None, *,
                   outputs: list[dict[str, Any]], base_model: str | None = None, readme: bool = False,
                   tool: str = "mistralrs") -> Path:
    """`write_residual` for what no output's records hold, then `write_report`."""
    covered: set[str] = set()
    for out in outputs:
        covered.update(out.get("_covered", ()))
    write_residual(model, directory, source_root, covered)
    return write_report(directory, outputs, base_model=base_model, readme=readme, tool=tool)
