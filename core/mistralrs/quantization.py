"""Choosing quantizers: ISQ type names, numeric shorthands, the sensitive-tensor policy, the
`--isq-organization`, topology pins and per-layer fallbacks. All of it is data from the
registered `QuantizerSpec`s; nothing here names a format (docs/quantization.md).

`IsqPlan.method_for(name, layer)` is what the loader calls for every linear layer at build
time (`loading.load_model(quant_method_for=...)`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from mistralrs.errors import ConfigError

log = logging.getLogger(__name__)

ORGANIZATIONS = ("default", "moqe")

# Token embeddings and LM heads: promoted to the type's `sensitive` type (mistral.rs's policy).
_SENSITIVE = re.compile(r"(^|\.)(lm_head|embed_out|output|embed_tokens|wte|word_embeddings|tok_embeddings)$")
# Routed experts (`--isq-organization moqe` quantizes only these); shared experts are not routed.
_ROUTED_EXPERT = re.compile(r"(^|\.)(experts|block_sparse_moe\.experts)\.\d+\.")


def _registry(registry: Any) -> Any:
    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    return registry


def isq_specs(registry: Any = None) -> list[Any]:
    """Every quantizer that can quantize float weights at load, by name."""
    return sorted((s for s in _registry(registry).quantizers if s.isq), key=lambda s: s.name)


def isq_type_names(registry: Any = None) -> list[str]:
    return [s.name for s in isq_specs(registry)]


def find_quantizer(name: str, registry: Any = None) -> Any | None:
    """The QuantizerSpec named `name` (case-insensitive, or an alias); None when there is none."""
    registry = _registry(registry)
    key = name.strip().lower()
    for spec in _registry(registry).quantizers:
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    return None


def resolve_isq_type(name: str | int, *, device_type: str = "cpu", registry: Any = None,
                     source: str = "--isq") -> Any:
    """The QuantizerSpec an ISQ name (case-insensitive, an alias, or a shorthand 2/3/4/5/6/8
    resolved for the device) stands for. Unknown names and types the device cannot run are a
    ConfigError naming `source` and the valid choices."""
    registry = _registry(registry)
    text = str(name).strip()
    if text.isdigit():
        bits = int(text)
        found = [s for s in registry.quantizers
                 if s.isq and s.shorthand == bits and device_type in s.shorthand_devices]
        if not found:
            numbers = sorted({s.shorthand for s in registry.quantizers
                              if s.isq and s.shorthand is not None and device_type in s.shorthand_devices})
            raise ConfigError(
                f"{source} {text}: no quantization type answers to {bits} bits on {device_type}; "
                f"use one of {', '.join(map(str, numbers)) or 'none'} or a type name ({', '.join(isq_type_names(registry))})"
            )
        spec = sorted(found, key=lambda s: (-s.priority, s.name))[0]
    else:
        spec = find_quantizer(text, registry)
        if spec is not None and not spec.isq:
            raise ConfigError(
                f"{source} {text!r}: {spec.name} is a storage type that loads from GGUF files but cannot be made "
                f"at load; choose one of {', '.join(isq_type_names(registry))}"
            )
        if spec is None:
            valid = isq_type_names(registry)
            raise ConfigError(
                f"{source} {text!r} is not a quantization type; choose one of {', '.join(valid) or '(none installed)'}"
                " or a bit count 2, 3, 4, 5, 6, 8"
            )
    if device_type not in spec.devices or not spec.is_supported(device=device_type):
        runs_on = ", ".join(spec.devices)
        raise ConfigError(
            f"{source} {spec.name} cannot run on {device_type} (it runs on {runs_on}); choose another type "
            f"({', '.join(s.name for s in isq_specs(registry) if device_type in s.devices)})"
        )
    return spec


def make_method(spec: Any, **options: Any) -> Any:
    """A fresh linear method object of a quantizer."""
    from mistralrs.specs import resolve

    return resolve(spec.method)(qtype=spec.name, **options)


def is_sensitive(name: str) -> bool:
    return _SENSITIVE.search(name) is not None


class IsqPlan:
    """Which quantizer each linear layer gets: topology pin > (organization, sensitive policy,
    the `--isq` type), then per-layer shape fallbacks."""

    def __init__(self, isq: str | None, *, device_type: str = "cpu", registry: Any = None,
                 topology: Any = None, organization: str | None = None, source: str = "--isq") -> None:
        self.registry = _registry(registry)
        self.device_type = device_type
        self.default = resolve_isq_type(isq, device_type=device_type, registry=self.registry, source=source) if isq else None
        self.topology = topology
        self.organization = organization or "default"
        if self.organization not in ORGANIZATIONS:
            raise ConfigError(f"--isq-organization {self.organization!r}: expected one of {', '.join(ORGANIZATIONS)}")
        self.importance: Any = None  # an imatrix.Imatrix: each quantized layer's method gets its row
        self.fallbacks: dict[tuple[str, str], list[str]] = {}  # (wanted, got) -> layer names
        self.counts: dict[str, int] = {}

    @property
    def active(self) -> bool:
        if self.default is not None:
            return True
        topo = self.topology
        return topo is not None and any(e.isq for e in [r[2] for r in topo.ranges] + [p[1] for p in topo.patterns])

    def type_for(self, name: str) -> Any | None:
        """The QuantizerSpec wanted for a layer (before shape fallbacks), or None."""
        if self.topology is not None:
            from mistralrs.topology import layer_index_of

            pinned = self.topology.isq_for(name + ".weight", layer_index_of(name))
            if pinned:
                return resolve_isq_type(pinned, device_type=self.device_type, registry=self.registry,
                                        source=f"{self.topology.path}:")
        spec = self.default
        if spec is None:
            return None
        if self.organization == "moqe" and _ROUTED_EXPERT.search(name + ".") is None:
            return None
        if is_sensitive(name) and spec.sensitive:
            promoted = find_quantizer(spec.sensitive, self.registry)
            if promoted is not None:
                return promoted
        return spec

    def target_name(self, name: str) -> str | None:
        """The type name wanted for a layer (None: not an ISQ target); for reports."""
        spec = self.type_for(name)
        return spec.name if spec is not None else None

    def method_for(self, name: str, layer: Any) -> Any | None:
        wanted = self.type_for(name)
        spec = wanted
        seen: set[str] = set()
        while spec is not None and spec.name not in seen:
            seen.add(spec.name)
            method = make_method(spec)
            if method.check_shape(layer.out_features, layer.in_features) is None:
                if self.importance is not None:
                    method.importance = self.importance.for_layer(name, layer.in_features)
                if wanted is not None and spec is not wanted:
                    self.fallbacks.setdefault((wanted.name, spec.name), []).append(name)
                self.counts[spec.name] = self.counts.get(spec.name, 0) + 1
                return method
            spec = find_quantizer(spec.fallback, self.registry) if spec.fallback else None
        if wanted is not None:
            self.fallbacks.setdefault((wanted.name, "unquantized"), []).append(name)
        return None

    def report(self) -> list[str]:
        """One line per (wanted, got) fallback, e.g. for the log at the end of loading."""
        lines = []
        for (wanted, got), names in sorted(self.fallbacks.items()):
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            lines.append(f"{len(names)} layer(s) cannot take {wanted} (e.g. {names[0]}{more}); they use {got}")
        return lines

    def log_summary(self) -> None:
        for line in self.report():
            log.warning("ISQ: %s", line)
        if self.counts:
            log.info("ISQ: %s", ", ".join(f"{n} layers {t}" for t, n in sorted(self.counts.items())))


def bits_per_weight(names: Iterable[str], registry: Any = None) -> dict[str, float]:
    """{type: bits per weight} for tune/doctor size estimates."""
    registry = _registry(registry)
    out = {}
    for name in names:
        spec = find_quantizer(name, registry)
        if spec is not None and spec.bits_per_weight:
            out[spec.name] = float(spec.bits_per_weight)
    return out
