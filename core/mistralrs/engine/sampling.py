"""Batched, vectorised token sampling for the engine.

One `Sampler.sample(logits, params, states)` call picks the next token of every sequence
in a step. `logits` is [S, V] float32 (one row per sequence that needs a token), `params[i]`
is that row's `SamplingParams` and `states[i]` its `SequenceSamplingState` (token history,
output counts, random generator). The caller appends the chosen token to the state
(`state.append(token)`) once it accepts it; `sample` never mutates the states except for
advancing the random generators of the rows it samples.

Processing order (as mistral.rs, `mistralrs-core/src/sampler.rs`):

1. `allowed_mask` (grammar constraints): disallowed tokens get -inf before anything else.
2. Penalties on the raw logits: DRY, then frequency/presence (over the *generated* tokens,
   OpenAI semantics) followed by repetition (llama.cpp style, over prompt + output) in one
   pass, then `logit_bias` (added).
3. Greedy rows (temperature < 1e-7 or top_k == 1): argmax of the processed logits.
4. Other rows: temperature, softmax, then top-k -> top-p -> min-p on the probabilities
   (top-p sees the distribution renormalised after top-k, as HF/vLLM; min-p is relative to
   the largest probability so renormalisation does not matter), then one draw.

Vectorisation: rows are reordered once (greedy | unfiltered | top-p without top-k | other
filtered) so each kind is a contiguous slice of one working copy, and the filters run as
tensor ops over all rows that use them. The vocabulary is never fully sorted: the kept set
of top-k/top-p/min-p is a prefix of the tokens sorted by probability, so a filtered row is
resolved on its own `torch.topk` candidates (its k; else 256, then 4096). The rare row whose
top-p nucleus or min-p set is larger goes to a sort-free path (a threshold for min-p; a
log-weight histogram for top-p, sorting only the bin where the cumulative mass crosses p).
Where a row is resolved depends on that row only. Python loops run over rows only.

Randomness: every state owns a `torch.Generator` seeded from the request `seed` (or a
fallback seed the engine derives from its global seed and a per-sequence counter, see
`derive_seed`). Each sampled row draws exactly one float64 uniform from its own generator per
call and inverts the CDF of its (unnormalised) filtered weights, so a row's tokens depend
only on its own seed, logits and history: the same whether it is sampled alone or in a
batch of 16 with other parameters. Inverse-CDF sampling replaces gpt-fast's
`argmax(probs / Exp(1) noise)` trick (which needs V exponential draws per row: ~2-4 ms per
row at V=128256 on CPU); it is equally free of host syncs. Full-vocabulary rows use a
two-level CDF (float64 block sums, then a cumsum inside one block), so no float32 cumsum
over the whole vocabulary biases the draw.

Logprobs follow vLLM's default: `log_softmax` of the RAW logits (before the mask,
penalties, bias, temperature and filters), for the chosen token and the `top_logprobs`
most likely tokens.

The per-sequence state and DRY live in `sampling_state`, the draw in `sampling_draw`, the
parameters in `sampling_params`; the names are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from mistralrs.engine.sampling_draw import Group, argmax_rows, draw, rows_tensor, wide_group
from mistralrs.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from mistralrs.engine.sampling_state import (
    DRY_LOOKBACK,
    DRY_MAX_MATCH,
    SequenceSamplingState,
    derive_seed,
    dry_breaker_ids,
)

__all__ = [
    "DRY_LOOKBACK",
    "DRY_MAX_MATCH",
    "MAX_TOP_LOGPROBS",
    "SampleOutput",
    "Sampler",
    "SamplingParams",
    "SequenceSamplingState",
    "derive_seed",
    "dry_breaker_ids",
    "processed_probs",
]

_CANDIDATES = (256, 4096)
_FLOAT32_MAX = torch.finfo(torch.float32).max


@attrs.frozen
class SampleOutput:
    token_ids: list[int]
    """The chosen token of every row."""
    logprobs: list[float | None] | None
    """log_softmax(raw logits) of the chosen token, per row (None for rows that did not ask
    for logprobs); None when no row asked."""
    top_logprobs: list[list[tuple[int, float]]] | None
    """Per row, its `top_logprobs` most likely (token, logprob) pairs of the raw logits, sorted
    descending ([] for rows that asked for none); None when no row asked for logprobs."""


def _effective(p: SamplingParams, V: int) -> tuple[float, int, float, float]:
    """(temperature, top_k, top_p, min_p) with disabled filters as 0."""
    T = p.temperature if p.temperature is not None else 1.0
    k = p.top_k if p.top_k is not None and 0 < p.top_k < V else 0
    tp = p.top_p if p.top_p is not None and 0 < p.top_p < 1 else 0.0
    mp = p.min_p if p.min_p is not None and 0 < p.min_p < 1 else 0.0
    return T, k, tp, mp


class _Plan:
    """The rows reordered as greedy | unfiltered | top-p without top-k | other filtered, so
    every kind is a contiguous slice of one working copy of the logits."""

    def __init__(self, params: Sequence[SamplingParams], V: int) -> None:
        self.eff = [_effective(p, V) for p in params]
        greedy: list[int] = []
        plain: list[int] = []
        p_only: list[int] = []
        rest: list[int] = []
        for i, p in enumerate(params):
            _, k, tp, mp = self.eff[i]
            if p.is_greedy:
                greedy.append(i)
            elif not (k or tp or mp):
                plain.append(i)
            elif tp and not k:
                p_only.append(i)
            else:
                rest.append(i)
        self.order = greedy + plain + p_only + rest
        self.n_greedy, self.n_plain, self.n_p_only = len(greedy), len(plain), len(p_only)


class Sampler:
    """Stateless batched sampler (see the module docstring for the semantics)."""

    def __init__(self, *, candidate_sizes: Sequence[int] = _CANDIDATES) -> None:
        """`candidate_sizes`: the increasing top-k candidate counts tried for rows filtered by
        top-p/min-p without top-k before the sort-free wide path (tests use tiny ones)."""
        sizes = tuple(int(k) for k in candidate_sizes)
        if not sizes or any(k < 1 for k in sizes):
            raise ValueError(f"candidate_sizes must be positive and non-empty, got {candidate_sizes!r}")
        self.candidate_sizes = sizes

    # -- public API

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        states: Sequence[SequenceSamplingState],
        *,
        allowed_mask: torch.Tensor | None = None,
    ) -> SampleOutput:
        """One token per row of `logits` [S, V]. The caller appends the tokens to the states."""
        self._check(logits, params, states)
        S, V = logits.shape
        if S == 0:
            return SampleOutput([], None, None)
        plan = _Plan(params, V)
        G = plan.n_greedy
        if G == S and allowed_mask is None and not any(p.uses_penalties for p in params):
            tokens = argmax_rows(logits)
        else:
            x = self._process(logits, params, states, allowed_mask, plan.order)
            ordered = torch.empty(S, dtype=torch.long, device=x.device)
            if G:
                ordered[:G] = argmax_rows(x[:G])
            if G < S:
                rows = plan.order[G:]
                generators = [states[i].generator for i in rows]
                groups = self._filter(x[G:], [plan.eff[i] for i in rows], plan.n_plain, plan.n_p_only)
                for group in groups:
                    picked = draw(group, [generators[r] for r in group.rows])
                    ordered[rows_tensor([G + r for r in group.rows], x.device)] = picked
            tokens = torch.empty_like(ordered)
            tokens[rows_tensor(plan.order, x.device)] = ordered
        token_ids = [int(t) for t in tokens.tolist()]
        logprobs, top = self._logprobs(logits, params, tokens)
        return SampleOutput(token_ids, logprobs, top)

    @torch.no_grad()
    def processed_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        states: Sequence[SequenceSamplingState] | None = None,
        *,
        allowed_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logits after the mask, DRY, frequency/presence/repetition penalties and
        logit_bias (before temperature), as a new float32 tensor. `states=None` means
        empty histories."""
        states = self._default_states(logits, states)
        self._check(logits, params, states)
        return self._process(logits, params, states, allowed_mask, list(range(logits.shape[0])))

    @torch.no_grad()
    def processed_probs(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        states: Sequence[SequenceSamplingState] | None = None,
        *,
        allowed_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The normalised distribution [S, V] each row is sampled from: after penalties,
        temperature and the top-k/top-p/min-p filters. Greedy rows are one-hot at the argmax."""
        states = self._default_states(logits, states)
        self._check(logits, params, states)
        S, V = logits.shape
        plan = _Plan(params, V)
        G = plan.n_greedy
        x = self._process(logits, params, states, allowed_mask, plan.order)
        ordered = torch.zeros(S, V, dtype=torch.float32, device=x.device)
        if G:
            ordered[torch.arange(G, device=x.device), x[:G].argmax(dim=-1)] = 1.0
        if G < S:
            effs = [plan.eff[i] for i in plan.order[G:]]
            for group in self._filter(x[G:], effs, plan.n_plain, plan.n_p_only):
                rows = rows_tensor([G + r for r in group.rows], x.device)
                w = group.weights.to(torch.float64)
                w = w / w.sum(dim=-1, keepdim=True)
                if group.idx is None:
                    ordered[rows] = w.to(torch.float32)
                else:
                    dense = torch.zeros(len(group.rows), V, dtype=torch.float64, device=x.device)
                    dense.scatter_add_(1, group.idx, w)  # padding entries add 0
                    ordered[rows] = dense.to(torch.float32)
        out = torch.empty_like(ordered)
        out[rows_tensor(plan.order, x.device)] = ordered
        return out

    # -- internals

    @staticmethod
    def _check(logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[Any]) -> None:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [S, V], got shape {tuple(logits.shape)}")
        if len(params) != logits.shape[0] or len(states) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows but {len(params)} params and {len(states)} states")

    @staticmethod
    def _default_states(
        logits: torch.Tensor, states: Sequence[SequenceSamplingState] | None
    ) -> Sequence[SequenceSamplingState]:
        if states is not None:
            return states
        return [SequenceSamplingState(fallback_seed=0) for _ in range(logits.shape[0])]

    def _process(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        states: Sequence[SequenceSamplingState],
        allowed_mask: torch.Tensor | None,
        order: list[int],
    ) -> torch.Tensor:
        """A new float32 tensor: the rows `order` of `logits` with the mask, penalties and
        bias applied (row j of the result is row order[j] of the input)."""
        S, V = logits.shape
        dev = logits.device
        order_t = rows_tensor(order, dev)
        x = logits.index_select(0, order_t).to(torch.float32)
        if allowed_mask is not None:
            if allowed_mask.shape != logits.shape:
                raise ValueError(
                    f"allowed_mask shape {tuple(allowed_mask.shape)} != logits shape {tuple(logits.shape)}"
                )
            allowed_mask = allowed_mask.to(device=dev, dtype=torch.bool)
            if not bool(allowed_mask.any(dim=-1).all()):
                bad = (~allowed_mask.any(dim=-1)).nonzero().flatten().tolist()
                raise ValueError(f"allowed_mask allows no token in row(s) {bad}")
            x.masked_fill_(~allowed_mask.index_select(0, order_t), -math.inf)
        rows = [(j, params[i], states[i]) for j, i in enumerate(order) if params[i].uses_penalties]
        if not rows:
            return x

        def flat(chunks: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
            r = torch.cat([torch.full((ids.numel(),), j, dtype=torch.long) for j, ids, _ in chunks])
            ids = torch.cat([ids for _, ids, _ in chunks])
            vals = torch.cat([v for _, _, v in chunks])
            ok = (ids >= 0) & (ids < V)  # ids past the vocab (e.g. Llama 3.2 hacks) carry no logit
            return r[ok].to(dev), ids[ok].to(dev), vals[ok].to(dev)

        # 1. DRY
        dry = []
        for j, p, s in rows:
            if p.dry_multiplier != 0:
                ids, pen = s.dry_penalties(p.dry_multiplier, p.dry_base, p.dry_allowed_length)
                if ids.numel():
                    dry.append((j, ids, pen))
        if dry:
            r, ids, pen = flat(dry)
            x.index_put_((r, ids), -pen, accumulate=True)

        # 2a. frequency / presence over the generated tokens: logit -= count * f + p
        freq = []
        for j, p, s in rows:
            if p.frequency_penalty != 0 or p.presence_penalty != 0:
                ids, counts = s.output_counts()
                if ids.numel():
                    freq.append((j, ids, counts * p.frequency_penalty + p.presence_penalty))
        if freq:
            r, ids, sub = flat(freq)
            x.index_put_((r, ids), -sub, accumulate=True)

        # 2b. repetition over prompt + output: positive logits / p, others * p
        rep = []
        for j, p, s in rows:
            if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
                ids = s.seen_ids()
                if ids.numel():
                    rep.append((j, ids, torch.full((ids.numel(),), float(p.repetition_penalty))))
        if rep:
            r, ids, rp = flat(rep)
            vals = x[r, ids]
            # A tiny penalty divides a logit past float32's range: keep it finite (the most likely).
            x[r, ids] = torch.where(vals > 0, vals / rp, vals * rp).clamp(max=_FLOAT32_MAX)

        # 3. logit bias (added; a -inf from the mask stays -inf)
        bias = [
            (
                j,
                torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long),
                torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32),
            )
            for j, p, _ in rows
            if p.logit_bias
        ]
        if bias:
            r, ids, b = flat(bias)
            x.index_put_((r, ids), b, accumulate=True)
        return x

    def _filter(
        self, w: torch.Tensor, effs: Sequence[tuple[float, int, float, float]], n_plain: int, n_p_only: int
    ) -> list[Group]:
        """Temperature + top-k/top-p/min-p, in place on the non-greedy rows `w` [R, V],
        ordered unfiltered | top-p without top-k | other filtered. Returns groups of rows
        with their unnormalised filtered weights (each row's maximum has weight 1)."""
        R, V = w.shape
        dev = w.device
        w.sub_(w.amax(dim=-1, keepdim=True))
        temps = [e[0] for e in effs]
        if any(t != 1.0 for t in temps):
            w.div_(torch.tensor(temps, dtype=torch.float32, device=dev)[:, None])
        w.exp_()  # exp((x - max) / T): softmax without the normalisation

        groups: list[Group] = []
        if n_plain:
            groups.append(Group(list(range(n_plain)), None, w[:n_plain]))
        F = R - n_plain
        if F == 0:
            return groups
        wf = w[n_plain:]
        feff = effs[n_plain:]
        k_l = [e[1] for e in feff]
        p_t = torch.tensor([e[2] for e in feff], dtype=torch.float64, device=dev)
        mp_t = torch.tensor([e[3] for e in feff], dtype=torch.float32, device=dev)
        has_k = torch.tensor([bool(k) for k in k_l], device=dev)
        has_p = p_t > 0
        has_m = mp_t > 0
        # top-p renormalises over top-k's kept mass (all k candidates are fetched) or, without
        # top-k, over the whole row.
        total_full = torch.zeros(F, dtype=torch.float64, device=dev)
        if n_p_only:
            total_full[:n_p_only] = wf[:n_p_only].sum(dim=-1, dtype=torch.float64)

        # Each row looks at a row-local number of candidates (its k, or the level's size), so
        # where a row is resolved never depends on the rest of the batch.
        pending = list(range(F))
        for base in self.candidate_sizes:
            if not pending:
                break
            lim_l = [k_l[i] if k_l[i] else min(base, V) for i in pending]
            kr = max(1, min(V, max(lim_l)))
            sel = rows_tensor(pending, dev)
            lim = torch.tensor(lim_l, dtype=torch.long, device=dev)
            sub = wf if len(pending) == F else wf.index_select(0, sel)
            vals, idx = sub.topk(kr, dim=-1, sorted=True)
            keep = torch.arange(kr, device=dev)[None, :] < lim[:, None]
            v = vals.to(torch.float64) * keep
            cum = v.cumsum(dim=-1)
            fetched = cum[:, -1]
            hk, hp, hm = has_k[sel], has_p[sel], has_m[sel]
            total = torch.where(hk, fetched, total_full[sel])
            threshold = torch.where(hp, p_t[sel] * total, torch.full_like(total, math.inf))
            keep &= (cum - v) < threshold[:, None]
            mp = mp_t[sel]
            keep &= vals > mp[:, None]
            keep[:, 0] = True  # the most likely token always survives
            # Resolved when no token past the candidates can be kept: top-k fetched whole,
            # or the top-p / min-p cut falls inside the candidates.
            resolved = hk | (lim >= V)
            resolved |= hp & (fetched >= threshold)
            resolved |= hm & (vals.gather(1, (lim - 1).clamp(max=kr - 1)[:, None]).squeeze(1) <= mp)
            done = resolved.nonzero().flatten()
            if done.numel():
                ids = [pending[i] for i in done.tolist()]
                groups.append(
                    Group(
                        [n_plain + i for i in ids],
                        idx.index_select(0, done),
                        (vals * keep).index_select(0, done),
                    )
                )
            pending = [pending[i] for i in (~resolved).nonzero().flatten().tolist()]
        if pending:
            rows = [n_plain + i for i in pending]
            sel = rows_tensor(pending, dev)
            groups.append(wide_group(wf.index_select(0, sel), rows, p_t[sel], total_full[sel], mp_t[sel]))
        return groups


    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: Sequence[SamplingParams], tokens: torch.Tensor
    ) -> tuple[list[float | None] | None, list[list[tuple[int, float]]] | None]:
        rows = [i for i, p in enumerate(params) if p.wants_logprobs]
        if not rows:
            return None, None
        S = logits.shape[0]
        r = rows_tensor(rows, logits.device)
        lp = torch.log_softmax(logits.index_select(0, r).to(torch.float32), dim=-1)
        chosen = lp.gather(1, tokens.to(logits.device).index_select(0, r)[:, None]).squeeze(1).tolist()
        out: list[float | None] = [None] * S
        top: list[list[tuple[int, float]]] = [[] for _ in range(S)]
        for i, value in zip(rows, chosen):
            out[i] = float(value)
        n = max(params[i].top_logprobs for i in rows)
        if n > 0:
            top_values, top_ids = lp.topk(min(n, lp.shape[-1]), dim=-1, sorted=True)
            value_rows, id_rows = top_values.tolist(), top_ids.tolist()
            for j, i in enumerate(rows):
                k = params[i].top_logprobs
                top[i] = [(int(t), float(v)) for t, v in zip(id_rows[j][:k], value_rows[j][:k])]
        return out, top


_DEFAULT_SAMPLER = Sampler()


def processed_probs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    states: Sequence[SequenceSamplingState] | None = None,
    *,
    allowed_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution [S, V] `Sampler.sample` draws each row from (see `Sampler.processed_probs`)."""
    return _DEFAULT_SAMPLER.processed_probs(logits, params, states, allowed_mask=allowed_mask)
