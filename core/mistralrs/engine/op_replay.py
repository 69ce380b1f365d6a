"""CPU decode graphs: a decode step's dispatcher ops recorded once, replayed as straight-line code.

On a CPU a decode step of a 1B model spends several milliseconds in Python around its kernels
(module calls, kernel lookups, shape logic): 10-15% of a quantized token. `CpuGraph` is the CPU
counterpart of `engine.decode_graphs.CudaGraph` for `DecodeGraphs`: `capture` runs the step under a
`TorchDispatchMode` that records every op the dispatcher sees (aten ops and the native kernels, which
are dispatcher ops) with its arguments, then writes the ops into a `torch.fx` graph whose generated
code calls them one after the other with nothing else in between; `replay` runs that code. Tensors the
ops did not produce (weights, the KV cache, the static input buffers, rotary tables) are the graph's
constants, held by reference: in-place writes (the KV cache) and updates of the static buffers between
replays are seen as in a CUDA graph.

What makes a step unsafe to replay is the same as for CUDA graphs, a host decision, but on a CPU nothing
fails on its own, so the recorder refuses one (`HostDecision`): reading a tensor on the host (``item``,
``bool``, ``tolist``, ``numpy``, ``equal``) or making a tensor from host values (``torch.tensor``). And it
records the step twice and refuses a step whose two recordings differ in their ops or in the constants
they read (a tensor made outside the dispatcher during the step, e.g. from a Python list, is a new
constant each time).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten


class HostDecision(RuntimeError):
    """The step reads a tensor on the host or builds one from host values: a replay would repeat the value."""


# What Tensor.item/bool/int, tolist, numpy, torch.equal and torch.tensor(...) reach the dispatcher as.
_HOST_OPS = {
    aten.item.default: "reads a tensor on the host (.item(), int(), float())",
    aten._local_scalar_dense.default: "reads a tensor on the host (.item(), int(), float())",
    aten.is_nonzero.default: "takes a branch on a tensor's value (bool())",
    aten.equal.default: "compares tensors on the host (torch.equal)",
    aten.resolve_conj.default: "reads a tensor on the host (.tolist() or .numpy())",
    aten.resolve_neg.default: "reads a tensor on the host (.tolist() or .numpy())",
    aten.lift_fresh.default: "makes a tensor from host values (torch.tensor(...))",
}
# Ops whose result's shape depends on the values (the code after them sizes its work by that shape).
_DATA_SHAPED = {
    aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _host_decision(func: Any, args: tuple, kwargs: dict) -> str | None:
    why = _HOST_OPS.get(func)
    if why is not None:
        return why
    if func in _DATA_SHAPED:
        return "sizes its work by tensor values (nonzero, unique, masked_select, torch.where(mask))"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None and len(args) < 2:
        return "sizes its work by tensor values (repeat_interleave without output_size)"
    if func in _INDEXING and len(args) > 1 and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()
    ):
        return "indexes with a boolean mask (its result's size depends on the values)"
    return None


class _Op:
    __slots__ = ("func", "args", "kwargs", "out")

    def __init__(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self.func, self.args, self.kwargs, self.out = func, args, kwargs, out


class _Recorder(TorchDispatchMode):
    """Runs every op and keeps it (function, arguments, result)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ in torch._dynamo.disable, whose first call imports
        # torch._dynamo (1.5-2 s at load); nothing here runs under torch.compile.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        why = _host_decision(func, args, kwargs)
        if why is not None:
            raise HostDecision(f"the step {why}: {func}")
        out = func(*args, **kwargs)
        self.ops.append(_Op(func, args, kwargs, out))
        return out


def record(fn: Callable[[], Any]) -> tuple[list[_Op], Any]:
    """Run `fn` once in inference mode (as the engine runs steps; there ``.tolist()`` and ``.numpy()``
    reach the dispatcher), recording its ops; its result is returned with them."""
    rec = _Recorder()
    with torch.inference_mode(), rec:
        result = fn()
    return rec.ops, result


def _constants(ops: list[_Op]) -> list[torch.Tensor]:
    """The tensors the ops read that none of them produced, in order of first use."""
    made: set[int] = set()
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for op in ops:
        for leaf in tree_flatten((op.args, op.kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf) not in made and id(leaf) not in seen:
                seen.add(id(leaf))
                out.append(leaf)
        for leaf in tree_flatten(op.out)[0]:
            if isinstance(leaf, torch.Tensor):
                made.add(id(leaf))
    return out


def same_step(a: list[_Op], b: list[_Op]) -> str | None:
    """Why two recordings of the step are not the same program (None: they are)."""
    if len(a) != len(b):
        return f"the step ran {len(a)} ops once and {len(b)} the next time"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.func is not y.func:
            return f"op {i} was {x.func} once and {y.func} the next time"
    ca, cb = _constants(a), _constants(b)
    if len(ca) != len(cb) or any(x is not y for x, y in zip(ca, cb)):
        return "the step reads tensors made on the host (a new one each time)"
    return None


def to_graph(ops: list[_Op], result: torch.Tensor) -> fx.GraphModule:
    """The recorded ops as an fx graph returning `result`; unproduced tensors become constants."""
    graph = fx.Graph()
    root = nn.Module()
    nodes: dict[int, fx.Node] = {}
    parts: dict[int, tuple[fx.Node, int]] = {}  # an element of a tuple result: (its op's node, index)
    keep: list[Any] = []  # the recorded tensors stay alive while their ids are keys

    def arg(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        node = nodes.get(id(v))
        if node is None:
            if id(v) in parts:  # first use of a part: index it out of its op's result
                node = graph.call_function(operator.getitem, parts[id(v)])
            else:
                name = f"c{len(keep)}"
                object.__setattr__(root, name, v)  # a plain attribute: the very tensor, not a copy
                node = graph.get_attr(name)
            nodes[id(v)] = node
            keep.append(v)
        return node

    for op in ops:
        node = graph.call_function(op.func, tree_map(arg, op.args), tree_map(arg, op.kwargs))
        if isinstance(op.out, torch.Tensor):
            nodes[id(op.out)] = node
        elif isinstance(op.out, (tuple, list)):
            for i, item in enumerate(op.out):
                if isinstance(item, torch.Tensor):
                    nodes.pop(id(item), None)
                    parts[id(item)] = (node, i)
        keep.append(op.out)
    if id(result) not in nodes and id(result) not in parts:
        raise HostDecision("the step's result was not made by its ops")
    graph.output(arg(result))
    return fx.GraphModule(root, graph)


_OP_CALL = re.compile(r"torch\.ops\.([\w.]+)\(")


def straight_line(module: fx.GraphModule) -> Callable[[], Any]:
    """The graph's generated code calling each op's C++ entry point (``OpOverload._op``, what
    ``OpOverload.__call__`` forwards to) instead of looking up ``torch.ops.<ns>.<op>.<overload>`` and going
    through ``__call__``: ~0.9 us less per op, ~0.35 ms a step for the ~390 ops of a 16-layer decode."""
    code = module.graph.python_code(root_module="self")
    globs = dict(code.globals)
    names: dict[str, str] = {}

    def direct(m: re.Match) -> str:
        path = m.group(1)
        if path not in names:
            fn = getattr(operator.attrgetter(path)(torch.ops), "_op", None)
            if fn is None:
                return m.group(0)
            names[path] = f"_op{len(names)}"
            globs[names[path]] = fn
        return names[path] + "("

    exec(compile(_OP_CALL.sub(direct, code.src), "<op_replay>", "exec"), globs)  # noqa: S102 - our own codegen
    return functools.partial(globs["forward"], module)


class CpuGraph:
    """A decode step recorded on the CPU (`DecodeGraphs.make_graph`): `capture` returns None (the
    replay returns the logits: a new tensor each time, unlike a CUDA graph's static output)."""

    def __init__(self) -> None:
        self.module: fx.GraphModule | None = None
        self._run: Callable[[], Any] | None = None

    def capture(self, fn: Callable[[], torch.Tensor], warmup: Callable[[], Any]) -> None:
        warmup()  # lazy tables and caches settle; the two recordings below must then agree
        first, _ = record(fn)
        ops, result = record(fn)
        why = same_step(first, ops)
        if why is not None:
            raise HostDecision(why)
        del first
        self.module = to_graph(ops, result)
        self._run = straight_line(self.module)
        return None

    def replay(self) -> torch.Tensor:
        assert self._run is not None
        return self._run()
