"""What the sampler remembers about one sequence (`SequenceSamplingState`: token history, output
counts, its own random generator) and the DRY penalty over that history; `derive_seed` and
`dry_breaker_ids` prepare a state's seed and DRY sequence breakers."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence

import torch

from mistralrs.engine.sampling_params import SamplingParams

DRY_LOOKBACK = 1024
"""DRY only looks at the last DRY_LOOKBACK tokens of prompt + output."""
DRY_MAX_MATCH = 50
"""Longest repeated suffix DRY measures (mistral.rs caps it at 50 against adversarial inputs)."""
_SEED_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------- seeds / DRY ids


def derive_seed(engine_seed: int, counter: int) -> int:
    """A well-mixed 64-bit seed for the `counter`-th sequence of an engine seeded with
    `engine_seed` (splitmix64), for requests that give no seed of their own."""
    z = (engine_seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _SEED_MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _SEED_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _SEED_MASK
    return z ^ (z >> 31)


def dry_breaker_ids(tokenizer_encode: Callable[[str], Sequence[int]], breakers: Iterable[str]) -> frozenset[int]:
    """Token ids of the DRY sequence breakers: every id of every breaker, each encoded on its
    own. Pass an encode function that adds no special tokens (as mistral.rs does)."""
    ids: set[int] = set()
    for breaker in breakers:
        if breaker:
            ids.update(int(t) for t in tokenizer_encode(breaker))
    return frozenset(ids)


# --------------------------------------------------------------------------- per-sequence state


class _Grow:
    """An append-only 1-D tensor with amortised O(1) appends."""

    __slots__ = ("data", "n")

    def __init__(self, dtype: torch.dtype, init: Sequence[int] | None = None) -> None:
        n = len(init) if init is not None else 0
        self.data = torch.empty(max(16, 2 * n), dtype=dtype)
        if n:
            self.data[:n] = torch.as_tensor(init, dtype=dtype)
        self.n = n

    def append(self, value: int | float) -> None:
        if self.n == self.data.numel():
            bigger = torch.empty(2 * self.n, dtype=self.data.dtype)
            bigger[: self.n] = self.data
            self.data = bigger
        self.data[self.n] = value
        self.n += 1

    def view(self) -> torch.Tensor:
        return self.data[: self.n]


class SequenceSamplingState:
    """What the sampler needs to remember about one sequence.

    * `tokens`: prompt + output ids (DRY looks at the last `dry_lookback` of them);
    * the generated-token counts (frequency/presence penalties) and the set of seen tokens
      (prompt + output, repetition penalty), kept incrementally as tensors;
    * `generator`: a `torch.Generator` seeded from `seed`, else `fallback_seed` (see
      `derive_seed`), else a random seed;
    * `dry_breakers`: the token ids that stop DRY matches (see `dry_breaker_ids`).

    `append(token_id)` is amortised O(1).
    """

    __slots__ = (
        "tokens",
        "num_prompt_tokens",
        "generator",
        "seed",
        "dry_breakers",
        "dry_lookback",
        "_breaker_tensor",
        "_out_slot",
        "_out_ids",
        "_out_counts",
        "_seen",
        "_seen_ids",
    )

    def __init__(
        self,
        prompt_ids: Iterable[int] = (),
        *,
        seed: int | None = None,
        fallback_seed: int | None = None,
        dry_breaker_token_ids: Iterable[int] = (),
        device: torch.device | str = "cpu",
        dry_lookback: int = DRY_LOOKBACK,
    ) -> None:
        self.tokens: list[int] = [int(t) for t in prompt_ids]
        self.num_prompt_tokens = len(self.tokens)
        if seed is None:
            seed = fallback_seed if fallback_seed is not None else secrets.randbits(63)
        self.seed = int(seed) & _SEED_MASK
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.dry_breakers = frozenset(int(t) for t in dry_breaker_token_ids)
        self._breaker_tensor = torch.tensor(sorted(self.dry_breakers), dtype=torch.long)
        self.dry_lookback = dry_lookback
        self._out_slot: dict[int, int] = {}
        self._out_ids = _Grow(torch.long)
        self._out_counts = _Grow(torch.float32)
        self._seen: set[int] = set(self.tokens)
        self._seen_ids = _Grow(torch.long, list(dict.fromkeys(self.tokens)))

    @classmethod
    def for_request(
        cls,
        params: SamplingParams,
        prompt_ids: Iterable[int],
        *,
        fallback_seed: int | None = None,
        tokenizer_encode: Callable[[str], Sequence[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> SequenceSamplingState:
        """A state for one sequence of a request; the DRY breakers are tokenized with
        `tokenizer_encode` when the request uses DRY."""
        breakers: frozenset[int] = frozenset()
        if params.dry_multiplier != 0 and tokenizer_encode is not None:
            breakers = dry_breaker_ids(tokenizer_encode, params.dry_sequence_breakers)
        return cls(
            prompt_ids,
            seed=params.seed,
            fallback_seed=fallback_seed,
            dry_breaker_token_ids=breakers,
            device=device,
        )

    # -- updates

    def append(self, token_id: int) -> None:
        token_id = int(token_id)
        self.tokens.append(token_id)
        slot = self._out_slot.get(token_id)
        if slot is None:
            self._out_slot[token_id] = self._out_ids.n
            self._out_ids.append(token_id)
            self._out_counts.append(1.0)
        else:
            self._out_counts.data[slot] += 1.0
        if token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids.append(token_id)

    def extend(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.append(t)

    # -- queries

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]

    def output_count(self, token_id: int) -> int:
        slot = self._out_slot.get(int(token_id))
        return 0 if slot is None else int(self._out_counts.data[slot])

    def output_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct generated token ids [U] int64, their counts [U] float32) - views."""
        return self._out_ids.view(), self._out_counts.view()

    def seen_ids(self) -> torch.Tensor:
        """Distinct prompt + output token ids [N] int64 (a view)."""
        return self._seen_ids.view()

    def dry_penalties(self, multiplier: float, base: float, allowed_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DRY penalties for the next token: (token ids [N] int64, penalties [N] float32).

        The text-generation-webui / koboldcpp algorithm (mistral.rs `apply_dry_penalty`):
        for every earlier occurrence i of the last token (no penalty if the last token is a
        breaker), the candidate is the token after it, tokens[i + 1] (skipped if a breaker);
        the match is extended backwards while tokens[i - k] == tokens[-1 - k] and the tail
        token is not a breaker, up to DRY_MAX_MATCH. Each candidate keeps its longest match
        L, and L >= allowed_length costs multiplier * base ** (L - allowed_length).
        """
        empty = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float32)
        if multiplier == 0 or len(self.tokens) < 2:
            return empty
        window = self.tokens[-self.dry_lookback :] if self.dry_lookback > 0 else self.tokens
        n = len(window)
        last = window[-1]
        breakers = self.dry_breakers
        if last in breakers:
            return empty
        # How far a match can extend backwards: up to the most recent breaker of the tail.
        max_ext = 0
        while max_ext < DRY_MAX_MATCH - 1 and max_ext < n - 1 and window[n - 2 - max_ext] not in breakers:
            max_ext += 1
        w = torch.tensor(window, dtype=torch.long)
        occ = (w[:-1] == last).nonzero().squeeze(1)
        if occ.numel() == 0:
            return empty
        nxt = w[occ + 1]
        if breakers:
            ok = ~torch.isin(nxt, self._breaker_tensor)
            occ, nxt = occ[ok], nxt[ok]
            if occ.numel() == 0:
                return empty
        if max_ext > 0:
            ks = torch.arange(1, max_ext + 1)
            back = occ[:, None] - ks[None, :]
            same = (w[back.clamp(min=0)] == w[n - 1 - ks][None, :]) & (back >= 0)
            length = 1 + same.to(torch.int32).cumprod(dim=1).sum(dim=1)
        else:
            length = torch.ones_like(occ)
        uniq, inverse = torch.unique(nxt, return_inverse=True)
        best = torch.zeros(uniq.numel(), dtype=torch.long).scatter_reduce(
            0, inverse, length.to(torch.long), reduce="amax", include_self=False
        )
        sel = best >= allowed_length
        if not bool(sel.any()):
            return empty
        exps = (best[sel] - allowed_length).to(torch.float64)
        penalty = multiplier * torch.pow(torch.tensor(float(base), dtype=torch.float64), exps)
        return uniq[sel], penalty.clamp(max=1e30).to(torch.float32)  # a ban, but finite in float32


