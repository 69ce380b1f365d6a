"""Device mapping: which device holds each decoder layer, the embeddings and the LM head.

Three sources, as in mistral.rs (docs/distributed.md):

- ``-n/--device-layers "0:16;1:16"``: layers per device in order (``ORD`` is an ordinal of the
  accelerator, or a device name: ``cpu``, ``cuda:1``, ``cuda[1]``, ``mps``); a bare ``-n 16``
  puts 16 layers on accelerator 0. Layers no entry covers go to the CPU.
- the topology file's ``device:`` keys (per layer range; ``/regex/`` entries matching the head or
  the embeddings move those).
- automatic: layers fill the accelerators in ordinal order, then the CPU, from each device's free
  memory after the reservations of `auto_plan` (KV cache for ``--max-seq-len`` x
  ``--max-batch-size`` per layer, activations, the non-mapped parts on the first device).

Layers placed on the CPU while the model runs on an accelerator compute in float32 (mistral.rs's
rule: CPU matmuls in half precision are slow or missing). The plan is pure data: no torch here;
`device_placement` applies it to a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs

from mistralrs.errors import ConfigError

GiB = 1024**3
# Fraction of a device's free memory the automatic mapping plans to use (allocator slack, kernels' workspaces).
USABLE_FRACTION = 0.95
PREFILL_CHUNK = 4096

_BRACKET = re.compile(r"^(cuda|metal)\[(\d+)\]$")


def normalize_device(name: str, *, accelerator: str | None = None, where: str = "-n") -> str:
    """A device as torch spells it: ``cpu``, ``cuda:N``, ``mps``. A bare ordinal names the
    accelerator's device N (an error when there is none); ``cuda[N]``/``metal[N]`` are the topology
    file's spellings."""
    text = name.strip().lower()
    if text.isdigit():
        if accelerator is None or accelerator == "cpu":
            raise ConfigError(f"{where}: device ordinal {text} names a GPU and this machine runs on the CPU; "
                              "write cpu:N for CPU layers (or give --device cuda)")
        return "mps" if accelerator == "mps" else f"{accelerator}:{int(text)}"
    m = _BRACKET.match(text)
    if m:
        return "mps" if m.group(1) == "metal" else f"cuda:{int(m.group(2))}"
    if text in ("cpu", "mps", "cuda"):
        return "cuda:0" if text == "cuda" else text
    if re.fullmatch(r"cuda:\d+", text):
        return text
    raise ConfigError(f"{where}: unknown device {name!r}; write an ordinal (0), cpu, cuda:N, cuda[N] or mps")


def parse_device_layers(text: str, *, accelerator: str | None) -> list[tuple[str, int]]:
    """``-n`` text -> [(device, layers), ...] in order. One-line ConfigErrors name the entry."""
    spec = text.strip()
    if not spec:
        raise ConfigError("-n/--device-layers is empty; write ORD:NUM;... (e.g. 0:16;1:16) or a layer count")
    if spec.isdigit():
        return [(normalize_device("0", accelerator=accelerator), int(spec))]
    out: list[tuple[str, int]] = []
    for entry in spec.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        device, sep, count = entry.rpartition(":")
        if not sep or not device or not count.strip().isdigit():
            raise ConfigError(f"-n/--device-layers entry {entry!r} is not ORD:NUM; write e.g. 0:16;1:16 or cpu:8")
        out.append((normalize_device(device, accelerator=accelerator, where=f"-n entry {entry!r}"), int(count)))
    if not out:
        raise ConfigError("-n/--device-layers has no entries; write ORD:NUM;... (e.g. 0:16;1:16)")
    return out


@attrs.frozen
class ModelSizes:
    """What the fit needs to know about a model, in bytes (from `model_sizes` or made up in tests).

    layer_bytes: weights of each decoder layer as loaded (quantized layers at their quantized size);
    non_mapped_bytes: embeddings, final norm and LM head; kv_bytes_per_token: K and V of one token in
    one layer; float_layer: whether layers are float weights (they double in size as fp32 on the CPU
    when `dtype_bytes` is 2)."""

    layer_bytes: tuple[int, ...]
    non_mapped_bytes: int
    kv_bytes_per_token: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    dtype_bytes: int = 2
    float_layers: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


@attrs.frozen
class DeviceCapacity:
    device: str  # torch spelling: cuda:0, cpu, mps
    free_bytes: int


def activation_bytes(sizes: ModelSizes, max_seq_len: int, max_batch_size: int) -> int:
    """Peak activations of one forward over a full ``max_batch_size x max_seq_len`` prefill: the
    residual stream and the MLP's intermediate (4H + 2I per token) plus one layer's attention
    scores (heads x query chunk x L; a prefill chunk is at most `PREFILL_CHUNK` tokens, the
    engine's default token budget), in the activation dtype."""
    tokens = max_seq_len * max_batch_size
    per_token = 4 * sizes.hidden_size + 2 * sizes.intermediate_size
    scores = sizes.num_heads * min(tokens, PREFILL_CHUNK) * max_seq_len
    return (tokens * per_token + scores) * sizes.dtype_bytes


def kv_bytes_per_layer(sizes: ModelSizes, max_seq_len: int, max_batch_size: int) -> int:
    return sizes.kv_bytes_per_token * max_seq_len * max_batch_size


@attrs.frozen
class Placement:
    """Where each decoder layer runs (and in which dtype), plus the non-mapped parts.

    `groups`: one entry per plan entry (two ``cpu:N`` entries are two groups on one device, each
    with its own KV pool); `layer_group[i]` is layer i's group. `primary`: embeddings, final norm
    (and the LM head unless `head` says otherwise). `float32_groups`: groups that compute in fp32."""

    groups: tuple[str, ...]
    layer_group: tuple[int, ...]
    primary: str
    head: str
    float32_groups: frozenset[int] = frozenset()
    source: str = "auto"  # auto | device-layers | topology

    @property
    def num_layers(self) -> int:
        return len(self.layer_group)

    def layer_device(self, i: int) -> str:
        return self.groups[self.layer_group[i]]

    def layers_of(self, group: int) -> list[int]:
        return [i for i, g in enumerate(self.layer_group) if g == group]

    @property
    def trivial(self) -> bool:
        """Everything on one device in one group at the model dtype: nothing to apply."""
        return (len(set(self.layer_group)) <= 1 and not self.float32_groups
                and all(self.groups[g] == self.primary for g in set(self.layer_group)) and self.head == self.primary)

    def summary(self) -> list[dict[str, Any]]:
        """Per group: device, layer range(s), dtype note; then the non-mapped parts."""
        rows: list[dict[str, Any]] = []
        for g, device in enumerate(self.groups):
            layers = self.layers_of(g)
            if layers:
                rows.append({"device": device, "layers": _ranges(layers),
                             "dtype": "float32" if g in self.float32_groups else "model"})
        rows.append({"device": self.primary, "layers": "embeddings, final norm", "dtype": "model"})
        rows.append({"device": self.head, "layers": "lm_head", "dtype": "model"})
        return rows


def _ranges(layers: Sequence[int]) -> str:
    parts: list[str] = []
    start = prev = layers[0]
    for i in list(layers[1:]) + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _needs_fp32(device: str, primary: str) -> bool:
    return device == "cpu" and primary != "cpu"


def plan_from_device_layers(entries: Sequence[tuple[str, int]], num_layers: int, *, primary: str | None = None,
                            head: str | None = None) -> Placement:
    """`parse_device_layers` output -> a placement; layers past the entries go to the CPU (as
    mistral.rs). The primary device is the first entry's unless given."""
    total = sum(n for _, n in entries)
    if total > num_layers:
        raise ConfigError(f"-n/--device-layers places {total} layers but the model has {num_layers}; "
                          f"make the counts sum to at most {num_layers}")
    groups: list[str] = []
    layer_group: list[int] = []
    for device, count in entries:
        if count == 0:
            continue
        groups.append(device)
        layer_group.extend([len(groups) - 1] * count)
    if len(layer_group) < num_layers:
        groups.append("cpu")
        layer_group.extend([len(groups) - 1] * (num_layers - len(layer_group)))
    first = primary or (entries[0][0] if entries else "cpu")
    fp32 = frozenset(g for g, d in enumerate(groups) if _needs_fp32(d, first))
    return Placement(groups=tuple(groups), layer_group=tuple(layer_group), primary=first, head=head or first,
                     float32_groups=fp32, source="device-layers")


def plan_from_topology(topology: Any, num_layers: int, *, primary: str, accelerator: str | None) -> Placement | None:
    """The topology file's ``device:`` keys -> a placement (None when it names no device).
    Layers without a device stay on the primary device; a regex entry matching ``lm_head.weight``
    moves the head, one matching ``model.embed_tokens.weight`` moves the embeddings."""
    devices: list[str | None] = []
    for i in range(num_layers):
        entry = topology.for_layer(i)
        devices.append(entry.device if entry is not None else None)
    head_entry = topology.for_pattern("lm_head.weight")
    embed_entry = topology.for_pattern("model.embed_tokens.weight")
    if not any(devices) and not (head_entry and head_entry.device) and not (embed_entry and embed_entry.device):
        return None
    where = topology.path
    norm = [normalize_device(d, accelerator=accelerator, where=where) if d else primary for d in devices]
    first = normalize_device(embed_entry.device, accelerator=accelerator, where=where) \
        if embed_entry and embed_entry.device else primary
    head = normalize_device(head_entry.device, accelerator=accelerator, where=where) \
        if head_entry and head_entry.device else first
    groups: list[str] = []
    layer_group: list[int] = []
    for device in norm:  # consecutive layers on one device share a group
        if not groups or groups[-1] != device:
            groups.append(device)
        layer_group.append(len(groups) - 1)
    fp32 = frozenset(g for g, d in enumerate(groups) if _needs_fp32(d, first))
    return Placement(groups=tuple(groups), layer_group=tuple(layer_group), primary=first, head=head,
                     float32_groups=fp32, source="topology")


def auto_plan(sizes: ModelSizes, devices: Sequence[DeviceCapacity], *, max_seq_len: int = 4096,
              max_batch_size: int = 1, cpu_free_bytes: int | None = None,
              usable_fraction: float = USABLE_FRACTION) -> Placement:
    """Fill the accelerators in order, then the CPU. On each accelerator the reservation is its
    activations (`activation_bytes`) and, on the first, the non-mapped parts and the logits
    (batch x vocab x 4 bytes); each layer then needs its weights plus its KV cache for
    ``max_seq_len x max_batch_size`` tokens. Layers that fit nowhere go to the CPU (in fp32 when
    they are float and an accelerator runs the model). The whole model on the first device when it
    fits, as mistral.rs. `cpu_free_bytes` None: the CPU is not checked."""
    accel = [d for d in devices if d.device != "cpu"]
    n = sizes.num_layers
    if not accel:
        return Placement(groups=("cpu",), layer_group=(0,) * n, primary="cpu", head="cpu", source="auto")
    act = activation_bytes(sizes, max_seq_len, max_batch_size)
    kv = kv_bytes_per_layer(sizes, max_seq_len, max_batch_size)
    logits = max_batch_size * sizes.vocab_size * 4
    groups: list[str] = []
    layer_group: list[int] = []
    i = 0
    for k, dev in enumerate(accel):
        budget = int(dev.free_bytes * usable_fraction) - act
        if k == 0:
            budget -= sizes.non_mapped_bytes + logits
            if budget < 0:
                need = _gib(sizes.non_mapped_bytes + logits + act)
                raise ConfigError(f"{dev.device} has {_gib(dev.free_bytes)} free but the embeddings, head and "
                                  f"activations alone need {need}; lower --max-seq-len/--max-batch-size or quantize "
                                  "(--isq)")
        placed = 0
        while i < n and sizes.layer_bytes[i] + kv <= budget:
            budget -= sizes.layer_bytes[i] + kv
            i += 1
            placed += 1
        if placed:
            groups.append(dev.device)
            layer_group.extend([len(groups) - 1] * placed)
        if i == n:
            break
    primary = accel[0].device
    if i < n:
        scale = 4 // sizes.dtype_bytes if sizes.float_layers and sizes.dtype_bytes < 4 else 1
        rest = sum(sizes.layer_bytes[i:]) * scale + (n - i) * kv * scale
        if cpu_free_bytes is not None and rest > cpu_free_bytes * usable_fraction:
            raise ConfigError(f"the model does not fit: layers {i}-{n - 1} need {_gib(rest)} on the CPU (float32) "
                              f"and it has {_gib(cpu_free_bytes)} free; quantize (--isq) or lower "
                              "--max-seq-len/--max-batch-size")
        groups.append("cpu")
        layer_group.extend([len(groups) - 1] * (n - i))
    fp32 = frozenset(g for g, d in enumerate(groups) if _needs_fp32(d, primary))
    return Placement(groups=tuple(groups), layer_group=tuple(layer_group), primary=primary, head=primary,
                     float32_groups=fp32, source="auto")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def model_sizes(model: Any, kv_shape: dict[str, Any], *, cache_dtype_bytes: int | None = None) -> ModelSizes:
    """Sizes of a (meta-device) built model: per decoder layer the bytes of its parameters and
    buffers as they will be loaded (a quantizer's buffers at their quantized size)."""
    from mistralrs.topology import layer_index_of

    per_layer: dict[int, int] = {}
    non_mapped = 0
    dtype_bytes = 2
    quantized = False
    for name, t in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers()):
        nbytes = t.numel() * t.element_size()
        idx = layer_index_of(name)
        if idx is None:
            non_mapped += nbytes
        else:
            per_layer[idx] = per_layer.get(idx, 0) + nbytes
            if not t.is_floating_point():
                quantized = True
        if t.is_floating_point():
            dtype_bytes = t.element_size()
    layers = kv_shape["num_layers"]
    from mistralrs.attention import kv_elements_per_token

    per_token = kv_elements_per_token({**kv_shape, "num_layers": 1}) * (cache_dtype_bytes or dtype_bytes)
    cfg = getattr(model, "config", {}) or {}
    return ModelSizes(
        layer_bytes=tuple(per_layer.get(i, 0) for i in range(layers)), non_mapped_bytes=non_mapped,
        kv_bytes_per_token=per_token, hidden_size=int(cfg.get("hidden_size", 0) or 0),
        intermediate_size=int(cfg.get("intermediate_size", 0) or cfg.get("moe_intermediate_size", 0) or 0),
        num_heads=int(cfg.get("num_attention_heads", 0) or 0), vocab_size=int(cfg.get("vocab_size", 0) or 0),
        dtype_bytes=dtype_bytes, float_layers=not quantized,
    )


def free_memory(devices: Sequence[str]) -> list[DeviceCapacity]:
    """Free bytes of each accelerator (torch's report) and of the CPU (available RAM)."""
    import os

    out: list[DeviceCapacity] = []
    for device in devices:
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            out.append(DeviceCapacity(device, int(free)))
        elif device == "mps":
            import torch

            total = int(torch.mps.recommended_max_memory()) if hasattr(torch.mps, "recommended_max_memory") else 0
            out.append(DeviceCapacity(device, total - int(torch.mps.current_allocated_memory())))
        else:
            out.append(DeviceCapacity("cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")))
    return out


def accelerators(device_type: str) -> list[str]:
    """The visible devices of an accelerator type, in ordinal order (after CUDA_VISIBLE_DEVICES)."""
    if device_type == "cuda":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device_type == "mps":
        return ["mps"]
    return []


_SIZE = re.compile(r"^\s*([\d.]+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_capacities(text: str, *, where: str = "--plan-devices") -> list[DeviceCapacity]:
    """``cuda:0=24GB;cuda:1=24GiB`` -> capacities (a device list to plan for, not this machine's)."""
    out: list[DeviceCapacity] = []
    for entry in text.split(";"):
        if not entry.strip():
            continue
        device, sep, size = entry.partition("=")
        m = _SIZE.match(size)
        if not sep or not m:
            raise ConfigError(f"{where} entry {entry.strip()!r} is not DEVICE=SIZE; write e.g. cuda:0=24GB;cuda:1=24GB")
        unit = _UNITS[(m.group(2) or "b").lower()]
        out.append(DeviceCapacity(normalize_device(device, accelerator="cuda", where=where),
                                  int(float(m.group(1)) * unit)))
    if not out:
        raise ConfigError(f"{where} is empty; write e.g. cuda:0=24GB;cuda:1=24GB")
    return out


def device_layers_spec(placement: Placement) -> str:
    """The ``-n`` text that reproduces a placement (CPU layers after the last entry are implicit)."""
    runs: list[tuple[str, int]] = []
    for g in placement.layer_group:
        device = placement.groups[g]
        if runs and runs[-1][0] == device:
            runs[-1] = (device, runs[-1][1] + 1)
        else:
            runs.append((device, 1))
    if runs and runs[-1][0] == "cpu" and len(runs) > 1:
        runs.pop()
    return ";".join(f"{d.split(':', 1)[1] if d.startswith('cuda:') else d}:{n}" for d, n in runs)


def scaled(sizes: ModelSizes, factor: float, *, quantized: bool) -> ModelSizes:
    """The sizes with every layer's weights scaled (a quantization level's share of the float size)."""
    return attrs.evolve(sizes, layer_bytes=tuple(int(b * factor) for b in sizes.layer_bytes),
                        float_layers=sizes.float_layers and not quantized)


def tensor_parallel_sizes(num_heads: int, num_kv_heads: int, limit: int = 64) -> list[int]:
    """The -tp sizes the attention heads allow (each must divide the query and key/value heads)."""
    return [n for n in range(1, limit + 1) if num_heads % n == 0 and num_kv_heads % n == 0]
