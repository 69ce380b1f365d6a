"""Recurrent layers' math (hybrid models): torch references of the causal short convolution, the
Mamba-2 selective scan and the gated delta rule, each as a chunked form for prefill and a
one-token recurrent step for decode, plus `scan_sequences`, which runs a step's sequences through
them: every one-token sequence of the step in one batched recurrent step, each longer chunk
through the chunked form, starting from the state its slot holds (`state_cache`).

Shapes: a sequence's tokens are rows ``[n, ...]``; states are per sequence ``[S, ...]``. The
chunked forms follow transformers' torch paths (the same operations in the same order, float32
throughout) so logits match them; the step forms are the same recurrences one token at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensors = tuple[torch.Tensor, ...]
States = dict[str, torch.Tensor]


def scan_sequences(
    batch: object,
    inputs: Tensors,
    states: States,
    step: Callable[[Tensors, States], tuple[torch.Tensor, States]],
    chunk: Callable[[Tensors, States], tuple[torch.Tensor, States]],
) -> tuple[torch.Tensor, States]:
    """Run `inputs` (each ``[T, ...]``, the step's flat tokens) through a recurrence.

    `step(rows, states)` takes one token of each of D sequences (``[D, ...]``) and their states
    (``[D, ...]``); `chunk(rows, state)` takes one sequence's ``n`` tokens and its state (leading
    dim 1). Both return (outputs per token, new states). Returns (outputs ``[T, ...]``, every
    sequence's new states ``[S, ...]``)."""
    qsl = batch.query_start_loc  # type: ignore[attr-defined]
    lens = [qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)]
    new = {k: v.clone() for k, v in states.items()}
    out: torch.Tensor | None = None
    decode = [i for i, n in enumerate(lens) if n == 1]

    def place(rows: torch.Tensor | slice, y: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = y.new_empty(qsl[-1], *y.shape[1:])
        out[rows] = y

    if decode:
        dev = inputs[0].device
        rows = torch.tensor([qsl[i] for i in decode], dtype=torch.long, device=dev)
        idx = torch.tensor(decode, dtype=torch.long, device=dev)
        y, st = step(tuple(x.index_select(0, rows) for x in inputs), {k: v.index_select(0, idx) for k, v in states.items()})
        place(rows, y)
        for k, v in st.items():
            new[k].index_copy_(0, idx, v.to(new[k].dtype))
    for i, n in enumerate(lens):
        if n <= 1:
            continue
        y, st = chunk(tuple(x[qsl[i]:qsl[i + 1]] for x in inputs), {k: v[i:i + 1] for k, v in states.items()})
        place(slice(qsl[i], qsl[i + 1]), y)
        for k, v in st.items():
            new[k][i:i + 1] = v.to(new[k].dtype)
    assert out is not None, "scan_sequences needs at least one token"
    return out, new


# -- causal depthwise convolution (Mamba-2's conv1d, LFM2's short conv, Gated DeltaNet's conv) --------


class DepthwiseConv1d(nn.Module):
    """The checkpoints' depthwise ``conv1d`` parameters (``weight [C, 1, K]``, optional ``bias [C]``);
    the layers run them through `causal_conv1d` / `causal_conv1d_step` with ``weight[:, 0]``."""

    def __init__(self, channels: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(channels), requires_grad=False) if bias else None



def causal_conv1d(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: x ``[n, C]``, state ``[1, C, K - 1]`` (the previous K - 1 inputs), weight
    ``[C, K]`` -> (y ``[n, C]``, new state). No activation (callers apply their own)."""
    k = weight.shape[-1]
    full = torch.cat([state[0].to(x.dtype), x.transpose(0, 1)], dim=-1)  # [C, K - 1 + n]
    y = F.conv1d(full[None].to(weight.dtype), weight[:, None, :], bias, groups=weight.shape[0])[0]
    return y.transpose(0, 1).to(x.dtype), full[:, full.shape[-1] - (k - 1):][None]


def causal_conv1d_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """D sequences, one token each: x ``[D, C]``, state ``[D, C, K - 1]`` -> (y ``[D, C]``, new state)."""
    full = torch.cat([state.to(x.dtype), x[:, :, None]], dim=-1)  # [D, C, K]
    y = (full.to(weight.dtype) * weight[None]).sum(-1)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), full[:, :, 1:]


# -- Mamba-2 selective state space (SSD) ------------------------------------------------------------


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """transformers' stable segment sum: [..., L] -> [..., L, L] (-inf above the diagonal)."""
    n = x.size(-1)
    x = x[..., None].expand(*x.size(), n)
    x = x.masked_fill(~torch.tril(torch.ones(n, n, device=x.device, dtype=torch.bool), diagonal=-1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(n, n, device=x.device, dtype=torch.bool), diagonal=0), -torch.inf)


def mamba2_chunked(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   d: torch.Tensor, state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence through the SSD chunked scan. x ``[n, H, P]``, dt ``[n, H]`` (already
    softplus'ed and clamped), a ``[H]`` (negative), b/c ``[n, G, N]``, d ``[H]``, state
    ``[1, H, P, N]`` -> (y ``[n, H, P]`` float32, final state ``[1, H, P, N]`` float32)."""
    n, heads, _ = x.shape
    x, b, c = x.float()[None], b.float()[None], c.float()[None]
    b = b.repeat_interleave(heads // b.shape[2], dim=2, output_size=heads)
    c = c.repeat_interleave(heads // c.shape[2], dim=2, output_size=heads)
    pad = (chunk_size - n % chunk_size) % chunk_size
    d_res = d[..., None] * F.pad(x, (0, 0, 0, 0, 0, pad))
    x = x * dt[None, ..., None].float()
    a = a.float() * dt[None].float()

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, 0, 0, pad) if t.dim() == 4 else (0, 0, 0, pad))
        return t.reshape(t.shape[0], -1, chunk_size, *t.shape[2:])

    x, a, b, c = (chunks(t) for t in (x, a, b, c))
    a = a.permute(0, 3, 1, 2)
    a_cumsum = torch.cumsum(a, dim=-1)
    decay = torch.exp(_segment_sum(a))
    g = torch.einsum("bclhn,bcshn->bclsh", c, b)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", g * decay.permute(0, 2, 3, 4, 1), x)
    decay_states = torch.exp(a_cumsum[:, :, :, -1:] - a_cumsum)
    states = torch.einsum("bclhn,bclhp->bchpn", b * decay_states.permute(0, -2, -1, 1)[..., None], x)
    states = torch.cat([state[:, None].float(), states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(a_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    y_off = torch.einsum("bclhn,bchpn->bclhp", c, states) * torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).reshape(1, -1, heads, x.shape[-1]) + d_res
    return y[0, :n], final


def mamba2_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                d: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D sequences, one token each: x ``[D, H, P]``, dt ``[D, H]``, b/c ``[D, G, N]``, state
    ``[D, H, P, N]`` -> (y ``[D, H, P]`` float32, new state float32)."""
    heads = x.shape[1]
    x, dt = x.float(), dt.float()
    b = b.float().repeat_interleave(heads // b.shape[1], dim=1, output_size=heads)  # [D, H, N]
    c = c.float().repeat_interleave(heads // c.shape[1], dim=1, output_size=heads)
    da = torch.exp(dt * a.float())[..., None, None]
    new = state.float() * da + (dt[..., None, None] * b[:, :, None, :]) * x[..., None]
    y = torch.matmul(new, c[..., None])[..., 0] + x * d.float()[:, None]
    return y, new


# -- gated delta rule (Gated DeltaNet: Qwen3-Next's linear attention) ----------------------------------


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _delta_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 q/k L2-normalised (q also scaled by dk ** -0.5), repeated to v's head count."""
    heads = v.shape[-2]
    q, k, v = q.float(), k.float(), v.float()
    if q.shape[-2] != heads:
        q = q.repeat_interleave(heads // q.shape[-2], dim=-2)
        k = k.repeat_interleave(heads // k.shape[-2], dim=-2)
    q, k = _l2norm(q), _l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v


def gated_delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        state: torch.Tensor, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence through the chunked gated delta rule (the UT-transform form). q/k ``[n, Hk, Dk]``,
    v ``[n, Hv, Dv]``, g (log decay, <= 0) and beta ``[n, Hv]``, state ``[1, Hv, Dk, Dv]`` ->
    (out ``[n, Hv, Dv]`` float32, final state float32)."""
    n = q.shape[0]
    q, k, v = _delta_inputs(q, k, v)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, n, D]
    beta, decay = (x.float().transpose(0, 1)[None] for x in (beta, g))  # [1, H, n]
    pad = (chunk_size - n % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, decay = (F.pad(x, (0, pad)) for x in (beta, decay))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(1, x.shape[1], -1, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    decay = decay.reshape(1, decay.shape[1], -1, chunk_size)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    cum = decay.cumsum(dim=3)
    pairwise = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(ut, k_beta * cum.exp().unsqueeze(-1), upper=False, unitriangular=True)
    s = state.float()
    out = torch.zeros_like(new_values)
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    for i in range(q.shape[2]):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ s
        out[:, :, i] = q[:, :, i] @ s + intra[:, :, i] @ v_new
        s = s * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(1, out.shape[1], -1, out.shape[-1])[:, :, :n]
    return out[0].transpose(0, 1), s


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D sequences, one token each: q/k ``[D, Hk, Dk]``, v ``[D, Hv, Dv]``, g/beta ``[D, Hv]``,
    state ``[D, Hv, Dk, Dv]`` -> (out ``[D, Hv, Dv]`` float32, new state float32)."""
    q, k, v = _delta_inputs(q, k, v)
    s = state.float() * g.float().exp()[..., None, None]
    delta = (v - (s * k.unsqueeze(-1)).sum(dim=-2)) * beta.float()[..., None]
    s = s + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return (s * q.unsqueeze(-1)).sum(dim=-2), s
