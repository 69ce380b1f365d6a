"""Batched sampler (mistralrs.engine.sampling): exact penalty values, filter supports against a
sort-based reference, empirical distributions, per-request seed determinism across batch
compositions, DRY against a literal transcription of the reference algorithm, logprobs."""

from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistralrs.engine.sampling import (
    DRY_MAX_MATCH,
    Sampler,
    SamplingParams,
    SequenceSamplingState,
    derive_seed,
    dry_breaker_ids,
    processed_probs,
)

SAMPLER = Sampler()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to CPU contention stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def states_for(n: int, prompt=(), seed0: int = 0, **kw):
    return [SequenceSamplingState(prompt, seed=seed0 + i, **kw) for i in range(n)]


def draw_many(logits_row: torch.Tensor, params: SamplingParams, rows: int = 2000, calls: int = 10, **kw):
    """rows x calls draws of one logits row, each row with its own seed. Returns counts [V]."""
    V = logits_row.numel()
    logits = logits_row[None, :].expand(rows, V).contiguous()
    states = states_for(rows, seed0=1000)
    counts = torch.zeros(V, dtype=torch.long)
    for _ in range(calls):
        out = SAMPLER.sample(logits, [params] * rows, states, **kw)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=V)
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = int(counts.sum())
    support = probs > 0
    assert int(counts[~support].sum()) == 0, "sampled a token outside the support"
    expected = probs[support].double() * n
    stat = float((((counts[support].double() - expected) ** 2) / expected).sum())
    return stat, int(support.sum()) - 1


def chi2_limit(df: int) -> float:
    # Wilson-Hilferty approximation of the 1 - 1e-6 quantile (z = 4.75): a generous but real bound.
    z = 4.75
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def reference_probs(row: torch.Tensor, T: float, k: int | None, p: float | None, mp: float | None) -> torch.Tensor:
    """Sort-based float64 reference: softmax(x/T) -> top-k -> renormalise -> top-p -> min-p."""
    probs = torch.softmax(row.double() / T, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    sp = probs[order]
    keep = torch.ones_like(sp, dtype=torch.bool)
    if k is not None and 0 < k < len(sp):
        keep[k:] = False
    if p is not None and 0 < p < 1:
        q = sp * keep
        q = q / q.sum()
        excl = torch.cumsum(q, 0) - q
        keep &= excl < p
    if mp is not None and 0 < mp < 1:
        keep &= sp > mp * sp[0]
    out = torch.zeros_like(probs)
    out[order] = sp * keep
    return out / out.sum()


PROBS7 = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
LOGITS7 = PROBS7.log().float()


# --------------------------------------------------------------------------- params


def test_params_defaults_and_greedy():
    p = SamplingParams()
    assert not p.is_greedy and p.temperature is None and p.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=5e-8).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=0).is_greedy
    with pytest.raises(ValueError):
        SamplingParams(top_logprobs=21)
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0.0)


def test_logit_bias_accepts_dict_with_string_keys():
    p = SamplingParams(logit_bias={"3": 5, 7: -1.5})
    assert p.logit_bias == ((3, 5.0), (7, -1.5))
    hash(p)  # frozen and hashable
    q = SamplingParams.from_dict({"temperature": None, "top_k": 4, "logit_bias": {"1": 2}, "unknown": 1})
    assert q.temperature is None and q.top_k == 4 and q.logit_bias == ((1, 2.0),)


def test_with_defaults_fills_only_unset_fields():
    defaults = types.SimpleNamespace(temperature=0.6, top_k=None, top_p=0.9, min_p=None, repetition_penalty=1.1)
    p = SamplingParams(top_p=0.5).with_defaults(defaults)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.6, None, 0.5, None, 1.1)
    assert SamplingParams(temperature=0.0).with_defaults(defaults).temperature == 0.0
    bare = SamplingParams()
    assert bare.with_defaults(None) is bare
    assert bare.with_defaults(types.SimpleNamespace()) == bare  # missing attributes are fine


def test_with_defaults_generation_config():
    from mistralrs.generation_config import GenerationDefaults

    d = GenerationDefaults(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    p = SamplingParams(top_k=50).with_defaults(d)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.7, 50, 0.8, 1.05)
    # do_sample: false -> the authors ask for greedy decoding (as transformers does).
    greedy = SamplingParams().with_defaults(GenerationDefaults(temperature=0.7, top_p=0.8, do_sample=False))
    assert greedy.is_greedy and greedy.top_p is None
    explicit = SamplingParams(temperature=0.9).with_defaults(GenerationDefaults(temperature=0.7, do_sample=False))
    assert explicit.temperature == 0.9


def test_derive_seed_and_fallback_seed():
    seeds = {derive_seed(42, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**64 for s in seeds)
    assert derive_seed(42, 3) != derive_seed(43, 3)
    logits = torch.randn(1, 50)
    params = [SamplingParams(temperature=1.0)]
    a = SequenceSamplingState([1], fallback_seed=derive_seed(7, 0))
    b = SequenceSamplingState([1], fallback_seed=derive_seed(7, 0))
    ta = [SAMPLER.sample(logits, params, [a]).token_ids[0] for _ in range(20)]
    tb = [SAMPLER.sample(logits, params, [b]).token_ids[0] for _ in range(20)]
    assert ta == tb
    # The request seed wins over the fallback.
    assert SequenceSamplingState(seed=5, fallback_seed=9).seed == 5


def test_state_append_keeps_counts_and_seen():
    s = SequenceSamplingState([4, 4, 9])
    for t in [1, 4, 1, 1, 2]:
        s.append(t)
    assert s.tokens == [4, 4, 9, 1, 4, 1, 1, 2] and s.output_ids == [1, 4, 1, 1, 2]
    ids, counts = s.output_counts()
    assert dict(zip(ids.tolist(), counts.tolist())) == {1: 3.0, 4: 1.0, 2: 1.0}
    assert s.output_count(1) == 3 and s.output_count(9) == 0
    assert sorted(s.seen_ids().tolist()) == [1, 2, 4, 9]
    for t in range(100):  # buffers grow
        s.append(t)
    assert s.output_count(5) == 1 and len(s.seen_ids()) == 100


# --------------------------------------------------------------------------- greedy / temperature


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1e-9),
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=0.0, top_p=0.5, min_p=0.3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0),
    ]
    out = SAMPLER.sample(logits, params, states_for(6))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None
    probs = processed_probs(logits, params)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.all(probs.max(-1).values == 1)


def test_temperature_distribution_matches_softmax():
    torch.manual_seed(1)
    row = torch.randn(8) * 1.5
    for T in (0.7, 2.0):
        params = SamplingParams(temperature=T)
        expected = torch.softmax(row.double() / T, -1)
        assert torch.allclose(processed_probs(row[None], [params])[0].double(), expected, atol=1e-6)
        stat, df = chi_square(draw_many(row, params, rows=1000, calls=10), expected)
        assert stat < chi2_limit(df), (T, stat)


def test_unset_temperature_means_one():
    row = torch.randn(10)
    probs = processed_probs(row[None], [SamplingParams()])[0]
    assert torch.allclose(probs, torch.softmax(row, -1), atol=1e-6)


def test_full_vocabulary_draw_across_blocks():
    """Unfiltered rows draw through block sums; mass spread over several 512-token blocks
    and the short tail block must come out in the right proportions."""
    V = 1030
    row = torch.full((V,), -30.0)
    hot = {3: 0.3, 511: 0.1, 512: 0.15, 700: 0.2, 1024: 0.05, 1029: 0.2}
    for t, p in hot.items():
        row[t] = math.log(p)
    expected = torch.softmax(row.double(), -1)
    counts = draw_many(row, SamplingParams(temperature=1.0), rows=2000, calls=5)
    assert set(counts.nonzero().flatten().tolist()) <= set(hot)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[list(hot)] = True
    stat, df = chi_square(counts, torch.where(mask, expected, torch.zeros_like(expected)) / expected[mask].sum())
    assert stat < chi2_limit(df), stat


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("kw", "support"),
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_k": 0}, set(range(7))),
        ({"top_k": -1}, set(range(7))),
        ({"top_p": 0.7}, {0, 1, 2}),  # exclusive cumsum 0, .4, .65 < .7; .8 stops
        ({"top_p": 0.6}, {0, 1}),
        ({"top_p": 1.0}, set(range(7))),  # outside (0, 1): disabled
        ({"top_k": 3, "top_p": 0.7}, {0, 1}),  # top-p on the renormalised top-3: .5, .3125 | .8125
        ({"min_p": 0.3}, {0, 1, 2}),  # p > 0.12
        ({"min_p": 0.5}, {0, 1}),  # p > 0.2
        ({"min_p": 0.0}, set(range(7))),
        ({"top_p": 0.9, "min_p": 0.3}, {0, 1, 2}),
        ({"top_k": 5, "top_p": 0.95, "min_p": 0.2}, {0, 1, 2, 3}),  # top-p drops 4; min-p: p > 0.08
        ({"top_k": 5, "top_p": 0.95, "min_p": 0.3}, {0, 1, 2}),  # min-p: p > 0.12
    ],
)
def test_filters_keep_exact_support(kw, support):
    params = SamplingParams(temperature=1.0, **kw)
    probs = processed_probs(LOGITS7[None], [params])[0]
    assert set(probs.nonzero().flatten().tolist()) == support
    kept = PROBS7 * torch.tensor([i in support for i in range(7)])
    assert torch.allclose(probs, (kept / kept.sum()).float(), atol=1e-6)
    counts = draw_many(LOGITS7, params, rows=250, calls=4)
    assert set(counts.nonzero().flatten().tolist()) <= support


def test_filters_apply_after_temperature():
    # T=4 flattens: p ∝ PROBS7 ** 0.25, so top_p=0.6 keeps more tokens than at T=1.
    params = SamplingParams(temperature=4.0, top_p=0.6)
    ref = reference_probs(LOGITS7, 4.0, None, 0.6, None)
    probs = processed_probs(LOGITS7[None], [params])[0]
    assert (ref > 0).sum() == 4
    assert torch.allclose(probs.double(), ref, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_filters_match_sort_reference_on_large_vocab(seed):
    """Random rows and parameters, including nuclei larger than the first candidate sets
    (so the candidate escalation runs), against a plain full-sort reference."""
    g = torch.Generator().manual_seed(seed)
    V = 6000
    configs = [
        (1.0, None, 0.95, None),
        (1.3, None, 0.999, None),  # nucleus of thousands of tokens: escalates to the full vocab
        (0.8, 40, 0.9, None),
        (1.0, 300, None, 0.05),
        (2.0, None, None, 0.02),  # min-p alone, large kept set
        (0.5, 5000, 0.97, 0.001),
        (1.0, 7, None, None),
        (1.0, None, 0.5, 0.5),
    ]
    scales = [0.5, 1.0, 2.0, 4.0]
    logits = torch.randn(len(configs), V, generator=g) * scales[seed % 4]
    params = [SamplingParams(temperature=T, top_k=k, top_p=p, min_p=mp) for T, k, p, mp in configs]
    got = processed_probs(logits, params).double()
    for i, (T, k, p, mp) in enumerate(configs):
        ref = reference_probs(logits[i], T, k, p, mp)
        assert torch.equal(got[i] > 0, ref > 0), (i, int((got[i] > 0).sum()), int((ref > 0).sum()))
        assert torch.allclose(got[i], ref, atol=1e-6, rtol=1e-4), i


def test_candidate_escalation_does_not_change_results():
    """Tiny candidate sets force the filtered rows through the escalation levels and the
    sort-free wide path: the distributions must not depend on where a row was resolved."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 700, generator=g) * 2
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=1),
        SamplingParams(temperature=0.7, min_p=0.05, seed=2),
        SamplingParams(temperature=1.1, top_k=30, top_p=0.8, seed=3),
        SamplingParams(temperature=1.0, top_p=0.99, min_p=0.01, seed=4),
        SamplingParams(temperature=0.5, top_k=3, seed=5),
        SamplingParams(temperature=1.0, seed=6),
    ]
    small = Sampler(candidate_sizes=(2, 8))
    probs = SAMPLER.processed_probs(logits, params)
    assert torch.allclose(small.processed_probs(logits, params), probs, atol=1e-7)
    states = states_for(6, seed0=50)
    for _ in range(10):
        for i, t in enumerate(small.sample(logits, params, states).token_ids):
            assert probs[i, t] > 0


def test_half_precision_logits():
    logits = (torch.randn(3, 100) * 3).half()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5), SamplingParams(logprobs=True)]
    out = SAMPLER.sample(logits, params, states_for(3))
    assert out.token_ids[0] == int(logits[0].float().argmax())
    assert out.token_ids[1] in logits[1].float().topk(5).indices.tolist()
    assert out.logprobs[2] == pytest.approx(float(torch.log_softmax(logits[2].float(), -1)[out.token_ids[2]]), abs=1e-5)


def test_filtered_sampling_distribution():
    torch.manual_seed(3)
    row = torch.randn(40) * 2
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05)
    ref = reference_probs(row, 0.9, 10, 0.9, 0.05)
    counts = draw_many(row, params, rows=2000, calls=10)
    stat, df = chi_square(counts, ref)
    assert stat < chi2_limit(df), stat


# --------------------------------------------------------------------------- penalties


def penalised(logits_row, params, state):
    return SAMPLER.processed_logits(logits_row[None].clone(), [params], [state])[0]


LOG6 = torch.tensor([2.0, -1.0, 3.0, 0.5, -2.0, 1.0])


def hist_state():
    s = SequenceSamplingState([0, 1])  # prompt
    s.extend([1, 2, 2])  # output
    return s


def test_repetition_penalty_over_prompt_and_output():
    got = penalised(LOG6, SamplingParams(repetition_penalty=2.0), hist_state())
    assert got.tolist() == [1.0, -2.0, 1.5, 0.5, -2.0, 1.0]
    assert torch.equal(penalised(LOG6, SamplingParams(repetition_penalty=1.0), hist_state()), LOG6)


def test_a_tiny_repetition_penalty_stays_finite_and_samples():
    # logit / 1e-88 is past float32's range; it must not turn the row into NaN.
    params = SamplingParams(repetition_penalty=1e-88, temperature=0.7, seed=3)
    got = penalised(LOG6, params, hist_state())
    assert bool(torch.isfinite(got).all())
    out = SAMPLER.sample(LOG6[None].clone(), [params], [hist_state()])
    assert out.token_ids[0] in range(6)


def test_a_row_with_no_distribution_fails_instead_of_returning_a_token():
    bad = SamplingParams(temperature=0.7, seed=1)
    object.__setattr__(bad, "temperature", float("nan"))  # past the validators, as a buggy caller might
    with pytest.raises(ValueError, match="NaN"):
        SAMPLER.sample(LOG6[None].clone(), [bad], states_for(1))


def test_frequency_and_presence_count_generated_tokens_only():
    got = penalised(LOG6, SamplingParams(frequency_penalty=0.5), hist_state())
    assert got.tolist() == [2.0, -1.5, 2.0, 0.5, -2.0, 1.0]  # token 0 is prompt-only: untouched
    got = penalised(LOG6, SamplingParams(presence_penalty=0.25), hist_state())
    assert got.tolist() == [2.0, -1.25, 2.75, 0.5, -2.0, 1.0]
    got = penalised(LOG6, SamplingParams(frequency_penalty=-0.5), hist_state())  # negative encourages
    assert got.tolist() == [2.0, -0.5, 4.0, 0.5, -2.0, 1.0]


def test_penalties_combined_in_mistralrs_order():
    # frequency/presence first, then repetition on the result's sign, then the bias.
    params = SamplingParams(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={5: 1.5, 0: -0.5}
    )
    got = penalised(LOG6, params, hist_state())
    t1 = (-1.0 - 0.5 - 0.25) * 2.0
    t2 = (3.0 - 1.0 - 0.25) / 2.0
    assert torch.allclose(got, torch.tensor([2.0 / 2.0 - 0.5, t1, t2, 0.5, -2.0, 2.5]))


def test_penalties_only_touch_their_rows_and_ignore_out_of_vocab_ids():
    s = SequenceSamplingState([0, 1, 99])  # 99 >= V: ignored (mistral.rs skips such ids)
    s.extend([2, 2, 150])
    logits = torch.stack([LOG6, LOG6, LOG6])
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), SamplingParams()]
    got = SAMPLER.processed_logits(logits, params, [hist_state(), s, hist_state()])
    assert torch.equal(got[0], LOG6) and torch.equal(got[2], LOG6)
    assert got[1].tolist() == [1.0, -2.0, 0.5, 0.5, -2.0, 1.0]
    assert torch.equal(logits[1], LOG6)  # input not modified


def test_logit_bias_bans_and_forces():
    row = torch.zeros(10)
    counts = draw_many(row, SamplingParams(temperature=1.0, logit_bias={3: -100}), rows=300, calls=4)
    assert counts[3] == 0 and counts.sum() == 1200
    counts = draw_many(row, SamplingParams(temperature=1.0, logit_bias={7: 100}), rows=300, calls=4)
    assert counts[7] == 1200
    out = SAMPLER.sample(row[None], [SamplingParams(temperature=0, logit_bias=[(4, 0.5)])], states_for(1))
    assert out.token_ids == [4]


# --------------------------------------------------------------------------- DRY


def dry_reference(tokens, breakers, mult, base, allowed, lookback, cap=DRY_MAX_MATCH):
    """Literal transcription of text-generation-webui's DRYLogitsProcessor (with mistral.rs's cap)."""
    ctx = tokens[-lookback:]
    if len(ctx) < 2 or mult == 0:
        return {}
    last = ctx[-1]
    if last in breakers:
        return {}
    lengths: dict[int, int] = {}
    for i in range(len(ctx) - 1):
        if ctx[i] != last:
            continue
        nxt = ctx[i + 1]
        if nxt in breakers:
            continue
        ml = 1
        while ml < cap:
            j = i - ml
            if j < 0:
                break
            prev = ctx[-(ml + 1)]
            if ctx[j] != prev or prev in breakers:
                break
            ml += 1
        lengths[nxt] = max(lengths.get(nxt, 0), ml)
    return {t: mult * base ** (n - allowed) for t, n in lengths.items() if n >= allowed}


def dry_of(tokens, breakers=(), mult=0.8, base=1.75, allowed=2, lookback=1024):
    s = SequenceSamplingState(tokens, dry_breaker_token_ids=breakers, dry_lookback=lookback)
    ids, pen = s.dry_penalties(mult, base, allowed)
    return dict(zip(ids.tolist(), pen.tolist()))


def test_dry_hand_computed():
    # ... 1 2 3 | 4 1 2 3: the suffix "1 2 3" (length 3) was followed by 4.
    assert dry_of([1, 2, 3, 4, 1, 2, 3]) == pytest.approx({4: 0.8 * 1.75 ** (3 - 2)})
    # Only length-1 repeats: below allowed_length 2, no penalty...
    assert dry_of([5, 3, 4, 1, 3]) == {}
    # ...unless allowed_length is 1: multiplier * base**0.
    assert dry_of([5, 3, 4, 1, 3], allowed=1) == pytest.approx({4: 0.8})
    # Several continuations, each with its own longest match.
    got = dry_of([7, 1, 2, 9, 3, 1, 2, 8, 0, 7, 1, 2])
    assert got == pytest.approx({9: 0.8 * 1.75 ** (3 - 2), 8: 0.8})
    # Long repeats are capped at DRY_MAX_MATCH.
    assert dry_of([5] * 200) == pytest.approx({5: 0.8 * 1.75 ** (DRY_MAX_MATCH - 2)})


def test_dry_sequence_breakers_stop_matches():
    seq = [1, 2, 3, 4, 1, 2, 3]
    assert dry_of(seq, breakers={2}) == {}  # the tail match cannot cross a breaker: length 1
    assert dry_of(seq, breakers={1}) == pytest.approx({4: 0.8})  # match "2 3", length 2
    assert dry_of(seq, breakers={4}) == {}  # the continuation is a breaker
    assert dry_of(seq + [6], breakers={6}) == {}  # the last token is a breaker


def test_dry_applied_in_sampler_and_lookback():
    state = SequenceSamplingState([1, 2, 3, 4, 1, 2, 3])
    row = torch.zeros(8)
    got = penalised(row, SamplingParams(dry_multiplier=0.8), state)
    expected = torch.zeros(8)
    expected[4] = -0.8 * 1.75
    assert torch.allclose(got, expected)
    assert torch.equal(penalised(row, SamplingParams(dry_multiplier=0.0), state), row)
    # A short lookback window forgets the first occurrence.
    assert dry_of([1, 2, 3, 4, 1, 2, 3], lookback=4) == {}


def test_dry_breaker_ids_from_tokenizer():
    vocab = {"\n": [13], ":": [25], '"': [1, 2], "*": [9]}
    assert dry_breaker_ids(lambda s: vocab[s], ["\n", ":", '"', "*"]) == frozenset({13, 25, 1, 2, 9})
    s = SequenceSamplingState.for_request(
        SamplingParams(dry_multiplier=1.0, dry_sequence_breakers=[":"]), [1, 2], tokenizer_encode=lambda s: vocab[s]
    )
    assert s.dry_breakers == {25}


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), min_size=0, max_size=90),
    breakers=st.sets(st.integers(0, 4), max_size=2),
    allowed=st.integers(0, 4),
    lookback=st.sampled_from([8, 40, 1024]),
)
def test_dry_matches_reference_algorithm(tokens, breakers, allowed, lookback):
    got = dry_of(tokens, breakers=breakers, mult=0.5, base=1.5, allowed=allowed, lookback=lookback)
    ref = dry_reference(tokens, breakers, 0.5, 1.5, allowed, lookback)
    assert got.keys() == ref.keys()
    for t in ref:
        assert got[t] == pytest.approx(ref[t], rel=1e-6)


# --------------------------------------------------------------------------- determinism


TARGETS = [
    SamplingParams(temperature=1.0, seed=123),
    SamplingParams(temperature=0.8, top_p=0.97, seed=7),
    SamplingParams(temperature=1.2, top_k=50, top_p=0.9, min_p=0.02, seed=99),
    SamplingParams(temperature=0.9, min_p=0.1, frequency_penalty=0.3, repetition_penalty=1.2, seed=5),
    SamplingParams(temperature=1.0, dry_multiplier=0.8, presence_penalty=0.5, logit_bias={3: 2.0}, seed=11),
]
OTHERS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.5, top_k=3, seed=1),
    SamplingParams(temperature=0.7, top_p=0.5),
    SamplingParams(temperature=1.0, min_p=0.3, seed=2),
    SamplingParams(temperature=2.0, top_k=2000, top_p=0.99, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, logprobs=True, top_logprobs=5),
    SamplingParams(temperature=1.0, top_p=0.999),
]


def run_stream(
    target: SamplingParams, logits_row: torch.Tensor, n_others: int, steps: int = 10, sampler: Sampler = SAMPLER
) -> list[int]:
    V = logits_row.numel()
    g = torch.Generator().manual_seed(n_others)
    others = [OTHERS[i % len(OTHERS)] for i in range(n_others)]
    rows = [target, *others]
    pos = n_others // 2  # the target is not always row 0
    rows.insert(pos, rows.pop(0))
    states = [SequenceSamplingState([1, 2, 3, 1, 2], seed=p.seed, fallback_seed=100 + i) for i, p in enumerate(rows)]
    other_logits = torch.randn(max(n_others, 1), V, generator=g) * 3
    stream = []
    for _ in range(steps):
        logits = torch.cat([other_logits[:n_others], logits_row[None]])
        order = list(range(n_others))
        order.insert(pos, n_others)
        out = sampler.sample(logits[order], rows, states)
        for s, t in zip(states, out.token_ids):
            s.append(t)
        stream.append(out.token_ids[pos])
    return stream


@pytest.mark.parametrize("target", TARGETS, ids=["temp", "top_p", "top_k_p_min_p", "penalties", "dry_bias"])
def test_seed_gives_same_stream_alone_or_batched(target):
    torch.manual_seed(42)
    logits_row = torch.randn(3000) * 2.5
    alone = run_stream(target, logits_row, 0)
    assert alone == run_stream(target, logits_row, 0)
    assert alone == run_stream(target, logits_row, 15)
    assert alone == run_stream(target, logits_row, 6)
    other_seed = run_stream(attrs_evolve(target, seed=target.seed + 1), logits_row, 0)
    assert other_seed != alone


@pytest.mark.parametrize("target", TARGETS[1:4], ids=["top_p", "top_k_p_min_p", "penalties"])
def test_seed_stream_batch_invariant_through_every_resolution_path(target):
    """With tiny candidate sets, rows resolve at different levels or on the sort-free wide
    path depending on their own distribution only - never on the other rows."""
    small = Sampler(candidate_sizes=(4, 16))
    torch.manual_seed(43)
    logits_row = torch.randn(3000) * 1.5
    alone = run_stream(target, logits_row, 0, sampler=small)
    assert alone == run_stream(target, logits_row, 15, sampler=small)
    assert alone == run_stream(target, logits_row, 5, sampler=small)


def attrs_evolve(p, **kw):
    import attrs

    return attrs.evolve(p, **kw)


# --------------------------------------------------------------------------- logprobs / mask


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(4, 200) * 2
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=True, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, top_logprobs=3),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.3, top_p=0.8, logprobs=True, top_logprobs=20, logit_bias={0: 5.0}),
    ]
    states = states_for(4, prompt=[1, 2, 3])
    out = SAMPLER.sample(logits, params, states)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None and out.top_logprobs[2] == []
    for i in (0, 1, 3):
        assert out.logprobs[i] == pytest.approx(float(raw[i, out.token_ids[i]]), abs=1e-6)
    assert out.top_logprobs[0] == []
    assert len(out.top_logprobs[1]) == 3 and len(out.top_logprobs[3]) == 20
    for i in (1, 3):
        values = [v for _, v in out.top_logprobs[i]]
        assert values == sorted(values, reverse=True)
        ids = [t for t, _ in out.top_logprobs[i]]
        assert ids[0] == int(logits[i].argmax())
        assert values == pytest.approx(raw[i, ids].tolist(), abs=1e-6)
    assert out.top_logprobs[1][0][0] == out.token_ids[1]  # greedy picks the top raw token


def test_allowed_mask_respected_at_high_temperature():
    V = 64
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[5, 17, 40]] = True
    row = torch.zeros(V)
    row[0] = 50.0  # disallowed, overwhelmingly likely
    counts = draw_many(
        row,
        SamplingParams(temperature=100.0, logit_bias={0: 100}),
        rows=400,
        calls=3,
        allowed_mask=allowed[None].expand(400, V),
    )
    assert set(counts.nonzero().flatten().tolist()) <= {5, 17, 40} and counts.sum() == 1200
    assert (counts[[5, 17, 40]] > 300).all()  # near-uniform at T=100
    row[40] = 1.0
    out = SAMPLER.sample(row[None], [SamplingParams(temperature=0.0)], states_for(1), allowed_mask=allowed[None])
    assert out.token_ids == [40]
    probs = processed_probs(row[None], [SamplingParams(temperature=1.0, top_k=2)], allowed_mask=allowed[None])[0]
    assert set(probs.nonzero().flatten().tolist()) <= {5, 17, 40}
    with pytest.raises(ValueError, match="allows no token"):
        SAMPLER.sample(row[None], [SamplingParams()], states_for(1), allowed_mask=torch.zeros(1, V, dtype=torch.bool))


def test_empty_batch_and_shape_checks():
    assert SAMPLER.sample(torch.empty(0, 10), [], []).token_ids == []
    with pytest.raises(ValueError):
        SAMPLER.sample(torch.randn(2, 10), [SamplingParams()], states_for(1))
    with pytest.raises(ValueError):
        SAMPLER.sample(torch.randn(10), [SamplingParams()], states_for(1))


def test_argmax_rows_matches_torch_first_maximum_and_nan():
    from mistralrs.engine.sampling_draw import argmax_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1000, generator=g)
    x[1, 10] = x[1, 900] = 1e4  # a tie: the first one wins
    x[2, 7] = x[2, 300] = float("nan")  # NaN counts as the largest, the first one wins
    for t in (x, x[:, ::3], x.to(torch.float64), x.to(torch.bfloat16)):
        got = argmax_rows(t)
        assert got.dtype == torch.long and torch.equal(got, t.argmax(dim=-1))
    assert argmax_rows(x).tolist()[1:3] == [10, 7]
