"""The topology YAML of `--topology FILE`: per-layer and per-weight ISQ type and device.

mistral.rs's format: a mapping of selector -> entry, where an entry takes `isq` (an ISQ type
name, stored lowercase) and/or `device` (`cpu`, `cuda[N]` or `metal[N]`).

    0-16:                                   # decoder layers 0..15 (end exclusive)
      isq: q4k
      device: cuda[0]
    16: {isq: q8_0}                         # one layer: the same as 16-17
    '/self_attn\\.q_proj/': {isq: q6k}       # a regex, searched in the full weight name
    '/lm_head\\./': {device: cpu}

(In a flow mapping `{...}` YAML needs the device quoted: `{device: 'cuda[0]'}`.)

What applies to a weight: the range holding its decoder layer, then the last regex (file order)
that matches its name; the regex entry's fields override the range entry's, field by field.
Unlike mistral.rs (where the range with the higher end wins), overlapping ranges are an input
error here, so at most one range applies to a layer.

Every error is a `ConfigError` on one line naming the file and the selector, and the fix.
Nothing here imports torch: devices stay strings and ISQ names are checked only through the
`validate_isq` callback the caller passes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import attrs
import yaml

from mistralrs.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(cpu|cuda\[(\d+)\]|metal\[(\d+)\])$")
DEVICE_FORMS = "cpu, cuda[N] or metal[N] (e.g. cuda[0])"
ENTRY_KEYS = ("isq", "device")

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_INDEX = re.compile(r"^\d+$")
_SIGNED_RANGE = re.compile(r"^(-?\d+)\s*-\s*(-?\d+)$")
_SIGNED_INDEX = re.compile(r"^-\d+$")
_UNQUOTED_FLOW_DEVICE = re.compile(r"\{[^}\n]*:\s*(cuda|metal)\[")
_LAYER_CONTAINERS = frozenset({"layers", "h", "blocks"})
_SELECTOR_FORMS = "write START-END (e.g. 0-8, end exclusive), a layer index (e.g. 12) or /REGEX/"

IsqValidator = Callable[[str], "str | None"]


@attrs.frozen
class LayerTopology:
    """What a selector asks for: an ISQ type name (lowercase) and/or a device string."""

    isq: str | None = None
    device: str | None = None


@attrs.frozen
class Topology:
    """A parsed topology file. `ranges` and `patterns` are in file order."""

    path: str
    ranges: tuple[tuple[int, int, LayerTopology, str], ...] = ()
    patterns: tuple[tuple[re.Pattern, LayerTopology, str], ...] = ()

    def for_layer(self, layer_index: int) -> LayerTopology | None:
        """The range entry holding decoder layer `layer_index` (regexes not considered)."""
        for start, end, entry, _ in self.ranges:
            if start <= layer_index < end:
                return entry
        return None

    def for_pattern(self, name: str) -> LayerTopology | None:
        """The entry of the last regex (file order) found in `name`."""
        for pattern, entry, _ in reversed(self.patterns):
            if pattern.search(name):
                return entry
        return None

    def for_weight(self, name: str, layer_index: int | None = None) -> LayerTopology | None:
        """What applies to weight `name`: the regex entry's fields over the range entry's.

        `layer_index` defaults to `layer_index_of(name)`. None when nothing applies.
        """
        if layer_index is None:
            layer_index = layer_index_of(name)
        ranged = self.for_layer(layer_index) if layer_index is not None else None
        matched = self.for_pattern(name)
        if matched is None:
            return ranged
        if ranged is None:
            return matched
        return LayerTopology(
            isq=matched.isq if matched.isq is not None else ranged.isq,
            device=matched.device if matched.device is not None else ranged.device,
        )

    def isq_for(self, name: str, layer_index: int | None = None) -> str | None:
        entry = self.for_weight(name, layer_index)
        return entry.isq if entry is not None else None

    def device_for(self, name: str, layer_index: int | None = None) -> str | None:
        entry = self.for_weight(name, layer_index)
        return entry.device if entry is not None else None

    def check_layers(self, num_layers: int) -> None:
        """Refuse a range that reaches past the model's `num_layers` decoder layers."""
        for _start, end, _entry, selector in self.ranges:
            if end > num_layers:
                last = f"layers 0-{num_layers - 1}" if num_layers > 0 else "no decoder layers"
                raise ConfigError(
                    f"{self.path}: range {selector!r} reaches layer {end - 1} but the model has "
                    f"{num_layers} layers ({last}); keep every range end <= {num_layers}"
                )


def layer_index_of(weight_name: str) -> int | None:
    """The decoder layer index in a weight name: the number after the last `layers`, `h` or
    `blocks` component (`model.layers.12.mlp...`, `transformer.h.3...`). None for the
    embeddings, the final norm, `lm_head` and anything else outside the decoder stack."""
    parts = weight_name.split(".")
    found = None
    for i in range(len(parts) - 1):
        if parts[i] in _LAYER_CONTAINERS and parts[i + 1].isdigit():
            found = int(parts[i + 1])
    return found


def load_topology(path: str | os.PathLike, *, validate_isq: IsqValidator | None = None) -> Topology:
    """Read and parse the topology file at `path` (see `parse_topology`)."""
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: topology file not found; check the --topology path") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, not a topology file; pass the YAML file's path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where}: cannot read the topology file (not UTF-8: {exc.reason}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the topology file ({exc.strerror or exc}); check the path and its permissions"
        ) from None
    return parse_topology(text, where, validate_isq=validate_isq)


def parse_topology(text: str, path: str = "<topology>", *, validate_isq: IsqValidator | None = None) -> Topology:
    """Parse topology YAML `text`; `path` names the file in error messages.

    `validate_isq(name)` (given the lowercase name) returns an error message for an unknown ISQ
    type, else None.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if _UNQUOTED_FLOW_DEVICE.search(text):
            hint = "inside {...} quote the device: `0-16: {isq: q4k, device: 'cuda[0]'}`"
        else:
            hint = _example()
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)}); {hint}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {_kind(data)}"
        raise ConfigError(f"{path}: expected a mapping of selector to entry, got {got}; {_example()}")

    ranges: list[tuple[int, int, LayerTopology, str]] = []
    patterns: list[tuple[re.Pattern, LayerTopology, str]] = []
    for key, value in data.items():
        selector = _selector_text(path, key)
        if len(selector) >= 2 and selector.startswith("/") and selector.endswith("/"):
            try:
                pattern = re.compile(selector[1:-1])
            except re.error as exc:
                raise ConfigError(
                    f"{path}: regex {selector!r} is invalid ({exc}); fix the pattern between the slashes"
                ) from None
            patterns.append((pattern, _parse_entry(path, selector, value, validate_isq), selector))
            continue
        start, end = _parse_range(path, selector)
        entry = _parse_entry(path, selector, value, validate_isq)
        for other_start, other_end, _, other in ranges:
            if start < other_end and other_start < end:
                lo, hi = max(start, other_start), min(end, other_end) - 1
                shared = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
                raise ConfigError(
                    f"{path}: ranges {other!r} and {selector!r} overlap ({shared}); "
                    "give each layer at most one range (use a /regex/ to override single weights)"
                )
        ranges.append((start, end, entry, selector))
    return Topology(path=path, ranges=tuple(ranges), patterns=tuple(patterns))


def _selector_text(path: str, key: object) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ConfigError(f"{path}: selector {key!r} is not a layer range, index or regex; {_SELECTOR_FORMS}")
    return str(key)


def _parse_range(path: str, selector: str) -> tuple[int, int]:
    text = selector.strip()
    if _INDEX.match(text):
        start = int(text)
        return start, start + 1
    match = _RANGE.match(text)
    if match is None:
        if _SIGNED_INDEX.match(text) or _SIGNED_RANGE.match(text):
            raise ConfigError(f"{path}: selector {selector!r} has a negative layer number; layers count from 0")
        raise ConfigError(f"{path}: selector {selector!r} is not a layer range, index or regex; {_SELECTOR_FORMS}")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise ConfigError(
            f"{path}: range {selector!r} has start >= end; write START-END with START < END (end exclusive)"
        )
    return start, end


def _parse_entry(path: str, selector: str, value: object, validate_isq: IsqValidator | None) -> LayerTopology:
    where = f"{path}: {selector!r}"
    if value is None or value == {}:
        raise ConfigError(f"{where} is empty; give it isq and/or device (e.g. {{isq: q4k, device: cpu}})")
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where} must be a mapping with isq and/or device, got a {_kind(value)}; e.g. {{isq: q4k, device: cpu}}"
        )
    unknown = [str(k) for k in value if k not in ENTRY_KEYS]
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r}; an entry takes only isq and device")
    isq = value.get("isq")
    device = value.get("device")
    if isq is None and device is None:
        raise ConfigError(f"{where} is empty; give it isq and/or device (e.g. {{isq: q4k, device: cpu}})")
    if isq is not None:
        if not isinstance(isq, str) or not isq.strip():
            raise ConfigError(f"{where}: isq {isq!r} is not an ISQ type name; write a name such as q4k or q8_0")
        isq = isq.strip().lower()
        if validate_isq is not None:
            problem = validate_isq(isq)
            if problem:
                raise ConfigError(f"{where}: isq {isq!r}: {' '.join(str(problem).split())}")
    if device is not None and (not isinstance(device, str) or not DEVICE_PATTERN.match(device)):
        raise ConfigError(f"{where}: unknown device {device!r}; write {DEVICE_FORMS}")
    return LayerTopology(isq=isq, device=device)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "syntax error"
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return str(problem)
    return " ".join(str(exc).split())


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _example() -> str:
    return "write one key per selector, e.g. `0-16: {isq: q4k, device: 'cuda[0]'}`"
