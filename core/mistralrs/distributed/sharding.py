"""Tensor parallelism: a model's layers split over the ranks of a torch.distributed group.

`TensorParallel.shard(model)` runs on the meta-device model right after it is built, before any
quantizer chooses (so ISQ sees, and quantizes, the shard shapes):

- attention (`nn.attention.Attention`): q/k/v column-parallel (each rank keeps heads
  ``[r*H/N, (r+1)*H/N)`` and the matching key/value heads; its KV cache holds only those; with
  more ranks than KV heads each rank keeps the one KV head its query heads share, replicated),
  o_proj row-parallel, GPT-OSS sinks per head; one all-reduce on the attention's output;
- feed-forward (`GatedMLP`, `MLP`, and every expert of a `SparseMoE`): gate/up (fc1)
  column-parallel, down (fc2) row-parallel over the intermediate dimension; routers and
  one-output gates replicated; one all-reduce on the block's feed-forward output;
- the token embedding vocab-parallel (rows ``[r*ceil(V/N), ...)``, lookups outside the shard give
  zeros, one all-reduce) and the LM head column-parallel over the vocabulary (the logits
  all-gathered, so every rank holds [S, V]).

A row-parallel bias is added by rank 0 only. `tag(model)` (after quantizers chose) marks which
slice of each checkpoint tensor a parameter takes (``tp_select``, ``tp_full_shape``): the loader
then slices every tensor as it streams in, so a rank never holds more than its shard (the dummy
weights draw the whole tensor, as one process does, and keep the slice). A module the split does
not know (a Linear outside attention and feed-forward blocks, DeepSeek's latent attention, a
vision tower) is a one-line error naming it, not a silently replicated layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mistralrs.errors import ConfigError
from mistralrs.nn.attention import Attention
from mistralrs.nn.embedding import Embedding
from mistralrs.nn.linear import Linear
from mistralrs.nn.mlp import MLP, GatedMLP
from mistralrs.nn.moe import SparseMoE


def all_reduce(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum over the ranks, in place when it can be. gloo has no bf16/fp16 sum: those go through fp32."""
    import torch.distributed as dist

    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        wide = t.float()
        dist.all_reduce(wide, group=group)
        return wide.to(t.dtype)
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def all_gather_last(t: torch.Tensor, size: int, full: int, group: Any = None) -> torch.Tensor:
    """[..., n_r] shards of `size` columns (the last rank's may be short) -> [..., full]."""
    import torch.distributed as dist

    pad = size - t.shape[-1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :full]


class VocabParallel(nn.Module):
    """Mixed into a model's embedding class (`vocab_parallel_class`): the table holds rows
    [tp_start, tp_start + num_embeddings); ids outside give zeros before the all-reduce. The
    class's own forward (a family's multiplier) still runs, on the local ids."""

    tp_start = 0
    tp_group: Any = None
    num_embeddings: int

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.tp_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = super().forward(local.masked_fill(outside, 0))
        return all_reduce(x.masked_fill(outside.unsqueeze(-1), 0), self.tp_group)


_VOCAB_PARALLEL: dict[type, type] = {}


def vocab_parallel_class(cls: type) -> type:
    """`cls` (an `Embedding` or a family's subclass) with `VocabParallel` in front."""
    if cls not in _VOCAB_PARALLEL:
        _VOCAB_PARALLEL[cls] = type(f"VocabParallel{cls.__name__}", (VocabParallel, cls), {})
    return _VOCAB_PARALLEL[cls]


def _select(dim: int, start: int, length: int) -> Any:
    """The `tp_select` of a shard: rows (dim 0) or columns (dim 1) [start, start + length)."""
    def select(t: torch.Tensor) -> torch.Tensor:
        return t.narrow(dim, start, length).contiguous()

    return select


class TensorParallel:
    """This rank's share of a model: rank `rank` of `size` in `group` (None: the default group)."""

    def __init__(self, rank: int, size: int, group: Any = None) -> None:
        self.rank, self.size, self.group = int(rank), int(size), group
        self.columns: list[str] = []  # Linear names split along the output
        self.rows: list[str] = []  # Linear names split along the input
        self.vocab: list[str] = []  # the embedding and the LM head: rows of the vocabulary
        self.heads: list[str] = []  # per-head parameters (sinks)
        self.kv_heads: dict[str, int] = {}  # k/v projections of a replicated KV head -> its index
        self.kv_per_rank: int | None = None
        self._kv_counts: dict[str, int] = {}  # attention name -> the model's KV heads (replicated case)
        self.vocab_size = 0

    # -- the split, on the meta-device model ---------------------------------------------------
    def shard(self, model: nn.Module) -> None:
        from mistralrs.device_placement import decoder_layers

        n = self.size
        layers = decoder_layers(model)
        if not layers:
            raise ConfigError(f"tensor parallelism needs a decoder-layer stack; {type(model).__name__} has none")
        inside: set[str] = set()
        for _, (lname, layer) in sorted(layers.items()):
            inside.add(lname)
            for cname, child in layer.named_children():
                full = f"{lname}.{cname}"
                if isinstance(child, Attention):
                    self._shard_attention(full, child)
                elif any(isinstance(m, Linear) for m in child.modules()):
                    self._shard_ffn(full, child)
        vocab = int(getattr(model, "config", {}).get("vocab_size", 0) or 0)
        for name, module in model.named_modules():
            if any(name == p or name.startswith(p + ".") for p in inside):
                continue
            if isinstance(module, Embedding) and module.num_embeddings == vocab:
                self.vocab_size = vocab
                start, size = self.vocab_shard(vocab)
                module.num_embeddings = size
                module.weight = nn.Parameter(torch.empty(size, module.embedding_dim), requires_grad=False)
                module.__class__ = vocab_parallel_class(type(module))
                module.tp_start, module.tp_group = start, self.group  # type: ignore[assignment]
                self.vocab.append(f"{name}.weight")
            elif isinstance(module, Linear):
                if name != "lm_head" or module.out_features != vocab:
                    raise ConfigError(f"tensor parallelism does not know how to split {name!r} "
                                      f"({type(model).__name__}); run this model with -tp 1")
                self.vocab_size = vocab
                _, size = self.vocab_shard(vocab)
                self._resize(module, out_features=size)
                self.vocab.append(f"{name}.weight")
                if module.has_bias:  # Phi-2's head
                    self.vocab.append(f"{name}.bias")
            elif isinstance(module, (Attention, GatedMLP, MLP, SparseMoE)):
                raise ConfigError(f"tensor parallelism does not know how to split {name!r} outside the decoder "
                                  f"layers ({type(model).__name__}); run this model with -tp 1")
        if not self.vocab_size:
            raise ConfigError("tensor parallelism found no token embedding of config.json's vocab_size; run with -tp 1")
        self._wrap_model(model, n)

    def _kv_total(self, name: str) -> int:
        return self._kv_counts[name.rpartition(".")[0]]

    def vocab_shard(self, vocab: int) -> tuple[int, int]:
        per = math.ceil(vocab / self.size)
        start = min(self.rank * per, vocab)
        return start, max(0, min(per, vocab - start))

    def _resize(self, layer: Linear, *, in_features: int | None = None, out_features: int | None = None) -> None:
        if in_features is not None:
            layer.in_features = in_features
        if out_features is not None:
            layer.out_features = out_features
        layer.set_quant_method(layer.quant_method)  # parameters of the new shape

    def _shard_attention(self, name: str, attn: Attention) -> None:
        n = self.size
        kv = attn.num_kv_heads
        # more ranks than key/value heads: each rank keeps the one KV head its query heads use (replicated)
        replicate = kv % n != 0 and n % kv == 0 and attn.num_heads % n == 0
        if attn.num_heads % n or (kv % n and not replicate):
            raise ConfigError(f"tensor parallel size {n} must divide the attention heads: the model has "
                              f"{attn.num_heads} query and {kv} key/value heads; choose a -tp that divides "
                              f"{attn.num_heads} and divides or is a multiple of {kv}")
        if attn.qk_norm == "full":
            raise ConfigError(f"{name}: QK-norm over the whole projection (OLMo2-style) cannot be split yet; "
                              "run this model with -tp 1")
        q, k, v, o = (getattr(attn, x) for x in attn.names)
        self._resize(q, out_features=q.out_features // n)
        self.columns.append(f"{name}.{attn.names[0]}")
        for proj_name, proj in zip(attn.names[1:3], (k, v)):
            self._resize(proj, out_features=proj.out_features // (kv if replicate else n))
            if replicate:  # the rows of KV head rank * kv // n
                self.kv_heads[f"{name}.{proj_name}"] = self.rank * kv // n
                self._kv_counts[name] = kv
            else:
                self.columns.append(f"{name}.{proj_name}")
        self._resize(o, in_features=o.in_features // n)
        self.rows.append(f"{name}.{attn.names[3]}")
        attn.num_heads //= n
        attn.num_kv_heads = 1 if replicate else kv // n
        self.kv_per_rank = attn.num_kv_heads
        if attn.sinks is not None:
            attn.sinks = nn.Parameter(torch.empty(attn.num_heads), requires_grad=False)
            self.heads.append(f"{name}.sinks")
        attn.register_forward_hook(self._reduce_hook)

    def _shard_ffn(self, name: str, block: nn.Module) -> None:
        n = self.size
        split: set[int] = set()
        for sub_name, sub in [("", block), *block.named_modules()]:
            prefix = f"{name}.{sub_name}" if sub_name else name
            pairs: list[tuple[str, str]] = []
            if isinstance(sub, GatedMLP):
                pairs = [(sub.names[0], "col"), (sub.names[1], "col"), (sub.names[2], "row")]
            elif isinstance(sub, MLP):
                pairs = [(sub.names[0], "col"), (sub.names[1], "row")]
            for attr, kind in pairs:
                layer = getattr(sub, attr)
                if id(layer) in split:
                    continue
                split.add(id(layer))
                if kind == "col":
                    if layer.out_features % n:
                        raise ConfigError(f"tensor parallel size {n} must divide {prefix}'s intermediate size "
                                          f"{layer.out_features}; choose another -tp")
                    self._resize(layer, out_features=layer.out_features // n)
                    self.columns.append(f"{prefix}.{attr}")
                else:
                    self._resize(layer, in_features=layer.in_features // n)
                    self.rows.append(f"{prefix}.{attr}")
        for sub_name, sub in block.named_modules():
            if not isinstance(sub, Linear) or id(sub) in split:
                continue
            full = f"{name}.{sub_name}" if sub_name else name
            router = any(isinstance(m, SparseMoE) and m.router is sub for m in block.modules())
            if not (router or sub.out_features == 1):  # routers and scalar gates scale the summed output
                raise ConfigError(f"tensor parallelism does not know how to split {full!r}; run this model with -tp 1")
        block.register_forward_hook(self._reduce_hook)

    def _reduce_hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return all_reduce(output, self.group)
        raise ConfigError(f"{type(_module).__name__} returns {type(output).__name__}; tensor parallelism needs a tensor")

    def _wrap_model(self, model: nn.Module, n: int) -> None:
        """kv_cache_shape: this rank's key/value heads; compute_logits: gathered over the vocabulary."""
        kv_shape: Any = model.kv_cache_shape
        logits: Any = model.compute_logits
        vocab, (_, per) = self.vocab_size, (0, math.ceil(self.vocab_size / n))
        group = self.group

        def kv_cache_shape() -> dict[str, Any]:
            shape = dict(kv_shape())
            if self.kv_per_rank is not None:
                shape["num_kv_heads"] = self.kv_per_rank
            return shape

        def compute_logits(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return all_gather_last(logits(hidden, *args, **kwargs), per, vocab, group)

        object.__setattr__(model, "kv_cache_shape", kv_cache_shape)
        object.__setattr__(model, "compute_logits", compute_logits)
        object.__setattr__(model, "tensor_parallel", self)

    # -- which slice each parameter takes, after the quantizers chose --------------------------
    def tag(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        r = self.rank

        def mark(param: Any, dim: int, length: int) -> None:
            full = list(param.shape)
            full[dim] = length * self.size
            param.tp_full_shape = tuple(full)
            param.tp_select = _select(dim, r * length, length)

        for name in self.columns:
            layer = modules[name]
            for pname in ("weight", "bias"):
                p = layer._parameters.get(pname)
                if p is not None and p.is_floating_point():
                    mark(p, 0, p.shape[0])
        for name in self.rows:
            layer = modules[name]
            p = layer._parameters.get("weight")
            if p is not None and p.is_floating_point():
                mark(p, 1, p.shape[1])
            b = layer._parameters.get("bias")
            if b is not None:
                b.tp_full_shape = tuple(b.shape)
                b.tp_select = (lambda t: t) if r == 0 else (lambda t: torch.zeros_like(t))
        for name, head in self.kv_heads.items():
            layer = modules[name]
            for pname in ("weight", "bias"):
                p = layer._parameters.get(pname)
                if p is not None and p.is_floating_point():
                    rows = p.shape[0]
                    full = list(p.shape)
                    full[0] = rows * self._kv_total(name)
                    p.tp_full_shape = tuple(full)
                    p.tp_select = _select(0, head * rows, rows)
        for name in self.heads:
            p = params[name]
            mark(p, 0, p.shape[0])
        start, size = self.vocab_shard(self.vocab_size)
        for name in self.vocab:
            table: Any = params[name]
            table.tp_full_shape = (self.vocab_size, *table.shape[1:])
            table.tp_select = _select(0, start, size)
