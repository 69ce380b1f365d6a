"""Decode graphs: a decode step replayed instead of run through Python, on CUDA (CUDA graphs, as mistral.rs
has them) and on the CPU (`engine.op_replay`: its dispatcher ops recorded and replayed as straight-line
code). On by default where they are safe; ``MISTRALRS_CUDA_GRAPHS=0`` / ``MISTRALRS_CPU_GRAPHS=0`` (or
false/no/off) turns them off.

A decode-only step (every sequence one new token that samples; no images, no multi-component rotary
positions, no recurrent state) of ``n`` sequences runs as the replay of a graph captured for the smallest
batch size ``B >= n`` of the device's plan (CUDA: 1, 2, 4, 8, then multiples of 8 up to ``max_seqs``; CPU:
every size, since a padding row costs real work there), captured the first time a step of that size comes.
The graph's inputs are static buffers, updated in place before each replay: token ids, positions, KV slots,
block tables (``ceil(max_model_len / block_size)`` wide) and sequence lengths. Rows ``n..B-1`` are padding:
token 0 at position 0 writing its K/V into a slot of a block the engine keeps out of its pool (so padding
never touches a sequence's cache) and attending to that slot.

What is captured: the model's forward (embeddings, every layer's norms, projections, rotary, the KV write
and the paged decode kernel, MLPs/MoE) and the LM head over all B rows. What is not: everything on the
host (scheduling, building the step's inputs, sampling, the stop checks) and the copies into the static
buffers; sampling reads the replay's logits of the n real rows.

A graph is only as correct as the step is free of host decisions. Where one is taken, capture fails (on
CUDA a host read such as ``.item()`` or ``.tolist()`` is not allowed while capturing; on the CPU the
recorder refuses it: `op_replay.HostDecision`) and the engine runs eager steps from then on, saying why
once: the torch reference's decode attention and MoE loop, rotary types whose frequencies depend on the
sequence length. A value that would be baked in silently is why a backend opts in
(`AttentionBackend.static_decode_batch`: only the paged backend, whose decode reads nothing but the static
tensors) and why graphs are only on where the decode attention is a kernel that takes its lengths as a
tensor (Triton on cuda, the native AVX-512 kernel on the CPU: `why_not`).

`DecodeGraphs` takes the graph implementation as an argument, so the capture/replay plan (eligibility,
padding, per-size capture, static buffers) is tested on the CPU with a stand-in graph as well as with the
real CPU graph (tests/unit/test_decode_graphs.py) and for real on a GPU (tests/cuda).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("mistralrs.engine")

ENV = "MISTRALRS_CUDA_GRAPHS"
CPU_ENV = "MISTRALRS_CPU_GRAPHS"
ENVS = {"cuda": ENV, "cpu": CPU_ENV}


def graphs_enabled(env: str = ENV) -> bool:
    """MISTRALRS_CUDA_GRAPHS (or `env`): on unless 0, false, no or off."""
    return os.environ.get(env, "").strip().lower() not in ("0", "false", "no", "off")


def batch_sizes(max_seqs: int, device_type: str = "cuda") -> list[int]:
    """The decode batch sizes graphs are captured for. CUDA: 1, 2, 4, 8, 16, 24, ... and `max_seqs` itself
    (few captures; a padding row is nearly free on a GPU). CPU: every size (a padding row costs its share
    of the matmuls; a capture costs three forwards)."""
    if device_type == "cpu":
        return list(range(1, max_seqs + 1))
    sizes = [b for b in (1, 2, 4) if b < max_seqs] + list(range(8, max_seqs, 8))
    return sorted(set(sizes) | {max_seqs})


def pads(device: Any) -> bool:
    """Whether the device's plan pads batches (then the engine keeps a block out of its pool for the padding)."""
    return torch.device(device).type == "cuda"


def why_not(backend: Any, device: Any, *, registry: Any = None) -> str | None:
    """Why decode steps do not run as graphs (None: they do)."""
    from mistralrs.nn.kernels import device_type_of, lookup_accelerated

    kind = device_type_of(device)
    if kind not in ENVS:
        return "decode graphs run on cuda and cpu only"
    if not graphs_enabled(ENVS[kind]):
        return f"{ENVS[kind]}=0"
    if backend.num_blocks < 2:
        return "no KV cache"
    if getattr(backend, "states", None) is not None:
        return "the model has recurrent state (updated in place each step)"
    from mistralrs.attention import AttentionBackend

    if type(backend).static_decode_batch is AttentionBackend.static_decode_batch:
        return f"the {backend.name} attention backend reads host values each step (use the paged backend)"
    if lookup_accelerated("paged_attention_decode", device, registry) is None:
        fix = "install triton" if kind == "cuda" else "the native kernel needs a C++ compiler and AVX-512"
        return f"the decode attention is the torch reference (it reads the lengths on the host; {fix})"
    return None


class CudaGraph:
    """One `torch.cuda.CUDAGraph`: a warm-up run on a side stream (Triton compiles, the allocator and the
    model's lazy tables settle), then the capture into the graphs' shared memory pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.graph: Any = None

    def capture(self, fn: Callable[[], torch.Tensor], warmup: Callable[[], Any]) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warmup()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of the server's other threads does not break this thread's capture
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class _Captured:
    def __init__(self, graph: Any, buffers: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        self.graph, self.buffers, self.logits = graph, buffers, logits
        self.replays = 0


class DecodeGraphs:
    """Captured decode forwards of `model` through `backend`, one per padded batch size.

    `pad_block`: a block of the cache no sequence gets (the engine keeps it out of its pool), where padding
    rows write and read. `make_graph()`: a new graph (default `CudaGraph` on one shared memory pool; tests
    pass a stand-in).
    """

    def __init__(self, model: Any, backend: Any, device: Any, *, max_seqs: int, max_model_len: int,
                 pad_block: int | None, make_graph: Callable[[], Any] | None = None) -> None:
        self.model, self.backend, self.device = model, backend, torch.device(device)
        self.sizes = batch_sizes(max_seqs, self.device.type)
        self.block_size = backend.block_size
        self.max_positions = max_model_len
        self.width = -(-max_model_len // self.block_size)
        self.pad_block = pad_block
        if pad_block is None and self.sizes != list(range(1, max_seqs + 1)):
            raise ValueError("padded batch sizes need a pad block")
        self.make_graph = make_graph or (self._cuda_graph if self.device.type == "cuda" else self._cpu_graph)
        self._pool: Any = None
        self.graphs: dict[int, _Captured] = {}
        self.disabled: str | None = None

    def _cuda_graph(self) -> CudaGraph:
        if self._pool is None:  # one memory pool for every size: one graph replays at a time
            self._pool = torch.cuda.graph_pool_handle()
        return CudaGraph(self._pool)

    @staticmethod
    def _cpu_graph() -> Any:
        from mistralrs.engine.op_replay import CpuGraph

        return CpuGraph()

    def reset(self) -> None:
        """Drop every captured graph (they read the model's tensors as they were: after the weights change,
        e.g. re-quantization between steps, each size is captured again on its next step)."""
        self.graphs.clear()

    def padded_size(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def takes(self, inputs: Any) -> bool:
        """A decode-only step the graphs can run: one token per sequence, every one sampling, no images or
        multi-component positions, no recurrent-state slots, within the captured sizes and widths."""
        n = len(inputs.seq_lens)
        return (self.disabled is None and n > 0 and inputs.ids.shape[0] == n
                and inputs.sample_rows == list(range(n)) and inputs.mm is None and not inputs.rope
                and inputs.state_slots is None and inputs.block_tables is not None
                and inputs.block_tables.shape[1] <= self.width and max(inputs.seq_lens) <= self.max_positions
                and self.padded_size(n) is not None)

    def run(self, inputs: Any) -> tuple[torch.Tensor, list[int]] | None:
        """The step's logits [n, V] (float32) and sampling indices from a graph replay, or None when the
        step is not one the graphs take (or capturing failed: then never again)."""
        if not self.takes(inputs):
            return None
        n = len(inputs.seq_lens)
        size = self.padded_size(n)
        assert size is not None
        cap = self.graphs.get(size)
        if cap is None:
            cap = self._capture(size, inputs)
            if cap is None:
                return None
        else:
            self._fill(cap.buffers, inputs)
        out = cap.graph.replay()
        cap.replays += 1
        if out is None:  # a CUDA graph: its output is static, the next replay overwrites it
            return cap.logits[:n].clone(), inputs.sampling
        return out[:n], inputs.sampling

    def _fill(self, buf: dict[str, torch.Tensor], inputs: Any) -> None:
        """Copy the step into the static buffers; rows past the step are padding."""
        n = len(inputs.seq_lens)
        size = buf["ids"].shape[0]
        pad_slot = (self.pad_block or 0) * self.block_size  # used only when size > n (then pad_block is set)
        ids = torch.zeros(size, dtype=torch.long)
        ids[:n] = inputs.ids
        pos = torch.zeros(size, dtype=torch.long)
        pos[:n] = inputs.positions
        slots = torch.full((size,), pad_slot, dtype=torch.long)
        slots[:n] = inputs.slot_mapping
        tables = torch.zeros(size, self.width, dtype=buf["tables"].dtype)
        tables[:n, : inputs.block_tables.shape[1]] = inputs.block_tables
        tables[n:, 0] = self.pad_block or 0
        lens = torch.ones(size, dtype=torch.long)
        lens[:n] = torch.tensor(inputs.seq_lens, dtype=torch.long)
        for name, host in (("ids", ids), ("pos", pos), ("slots", slots), ("tables", tables), ("lens", lens)):
            buf[name].copy_(host)

    def _capture(self, size: int, inputs: Any) -> _Captured | None:
        from mistralrs.nn.rotary import static_positions

        dev = self.device
        buf = {
            "ids": torch.zeros(size, dtype=torch.long, device=dev),
            "pos": torch.zeros(size, dtype=torch.long, device=dev),
            "slots": torch.zeros(size, dtype=torch.long, device=dev),
            "tables": torch.zeros(size, self.width, dtype=inputs.block_tables.dtype, device=dev),
            "lens": torch.ones(size, dtype=torch.long, device=dev),
        }
        self._fill(buf, inputs)
        batch = self.backend.static_decode_batch(buf["slots"], buf["tables"], buf["lens"])
        if batch is None:
            self.disabled = f"the {self.backend.name} attention backend has no static decode batch"
            return None

        def forward() -> torch.Tensor:
            hidden = self.model.forward(buf["ids"], buf["pos"], batch)
            return self.model.compute_logits(hidden).float()

        def warmup() -> Any:
            # Its K/V writes are the ones the replay makes (same inputs, same slots); padding writes its own block.
            with static_positions(self.max_positions):
                return forward()

        def captured() -> torch.Tensor:
            with static_positions(self.max_positions):
                return forward()

        graph = self.make_graph()
        try:
            logits = graph.capture(captured, warmup)
        except Exception as exc:  # noqa: BLE001 - a host read in the step: run eagerly from now on
            self.disabled = f"capturing a decode step of {size} failed ({type(exc).__name__}: {exc})"
            log.warning("decode graphs off: %s; decode steps run eagerly", self.disabled)
            return None
        cap = self.graphs[size] = _Captured(graph, buf, logits)
        log.info("captured a decode graph for batches of %d", size)
        return cap
