"""The engine on a tiny real model: determinism under batching, prefix caching, chunked
prefill, preemption, cancellation, recovery, stops, choices and the Python API."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from mistralrs import protocol as P
from mistralrs.engine.engine import (
    ChoiceFinished,
    ContextTooLong,
    EngineError,
    GenerationRequest,
    RequestDone,
    RequestFailed,
    TokenDelta,
)
from mistralrs.engine.sampling import SamplingParams
from mistralrs.errors import InvalidRequest
from mistralrs.serving import ModelService, ServiceOptions
from tests.helpers.tiny_models import write_tiny_llama

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def service(model_dir, **kw) -> ModelService:
    kw.setdefault("dtype", "f32")
    kw.setdefault("pa_context_len", 4096)
    return ModelService(ServiceOptions(model_id=str(model_dir), **kw))


@pytest.fixture(scope="module")
def svc(model_dir):
    s = service(model_dir, max_seqs=16, pa_blk_size=8)
    yield s
    s.shutdown()


def prompt(svc, text: str) -> list[int]:
    return svc.encode_chat([{"role": "user", "content": text}])


def gen(svc, ids, **kw) -> tuple[int, ...]:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("max_tokens", 16)
    kw.setdefault("ignore_eos", True)
    done, _ = P.collect(svc.engine.submit(GenerationRequest(prompt_ids=ids, **kw)))
    return done.choices[0].token_ids


def reference_greedy(model_dir, ids, n):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tuple(out[0, len(ids):].tolist())


def test_greedy_matches_transformers(svc, model_dir):
    ids = prompt(svc, "Tell me about the weather today")
    assert gen(svc, ids, max_tokens=24) == reference_greedy(model_dir, ids, 24)


def test_same_tokens_alone_or_beside_15_others(svc):
    ids = prompt(svc, "The quick brown fox")
    alone = gen(svc, ids)
    handles = []
    for i in range(15):
        other = prompt(svc, f"request number {i} " * (i % 4 + 1))
        sampling = SamplingParams(temperature=0.9, top_k=20, seed=i) if i % 2 else GREEDY
        handles.append(svc.engine.submit(GenerationRequest(prompt_ids=other, sampling=sampling, max_tokens=12,
                                                           ignore_eos=True)))
    mine = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=16, ignore_eos=True))
    results = [P.collect(h)[0] for h in handles]
    assert all(len(r.choices[0].token_ids) == 12 for r in results)
    assert P.collect(mine)[0].choices[0].token_ids == alone


def test_seeded_sampling_is_reproducible_whatever_the_batch(svc):
    ids = prompt(svc, "Once upon a time")
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = gen(svc, ids, sampling=sampling)
    noise = [svc.engine.submit(GenerationRequest(prompt_ids=prompt(svc, f"noise {i}"),
                                                 sampling=SamplingParams(temperature=1.0, seed=i), max_tokens=10))
             for i in range(6)]
    again = gen(svc, ids, sampling=sampling)
    for h in noise:
        P.collect(h)
    assert again == alone
    assert gen(svc, ids, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=99)) != alone


def test_prefix_cache_skips_the_shared_prefill(svc):
    system = "You are a meticulous assistant. " * 12
    first = svc.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "first question"}])
    second = svc.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "second one"}])
    gen(svc, first, max_tokens=4)
    before = svc.engine.stats["computed_tokens"]
    done, _ = P.collect(svc.engine.submit(GenerationRequest(prompt_ids=second, sampling=GREEDY, max_tokens=4,
                                                            ignore_eos=True)))
    computed = svc.engine.stats["computed_tokens"] - before
    assert done.usage.cached_tokens >= len(system) // 8  # many blocks reused
    assert computed == len(second) - done.usage.cached_tokens + 3  # rest of prompt + 3 decode steps


def test_prefix_cache_hit_gives_identical_tokens(model_dir, svc):
    ids = prompt(svc, "A long shared prompt that fills several blocks of the cache. " * 3)
    cold = gen(svc, ids)
    warm = gen(svc, ids)
    with_no_cache = service(model_dir, no_kv_cache=True)
    try:
        assert gen(with_no_cache, ids) == cold == warm
    finally:
        with_no_cache.shutdown()


@pytest.mark.parametrize("backend", ["sdpa", "paged"])
def test_backends_and_chunked_prefill_agree(model_dir, svc, backend):
    ids = prompt(svc, "Chunk me into small pieces, please. " * 4)
    expected = gen(svc, ids)
    other = service(model_dir, attention_backend=backend, max_num_batched_tokens=7, pa_blk_size=16)
    try:
        assert other.backend.name == backend
        assert gen(other, ids) == expected
    finally:
        other.shutdown()


def test_preemption_recomputes_and_still_answers_correctly(model_dir, svc):
    prompts = [prompt(svc, f"story {i} " * 3) for i in range(4)]
    expected = [gen(svc, p, max_tokens=20) for p in prompts]
    small = service(model_dir, pa_context_len=80, pa_blk_size=8, prefix_cache_n=0)
    try:
        handles = [small.engine.submit(GenerationRequest(prompt_ids=p, sampling=GREEDY, max_tokens=20,
                                                         ignore_eos=True)) for p in prompts]
        got = [P.collect(h)[0].choices[0].token_ids for h in handles]
        assert small.engine.scheduler.preemptions > 0
        assert got == expected
        assert small.engine.kv_blocks()[0] == 0
    finally:
        small.shutdown()


def test_cancel_frees_blocks_within_a_step(svc):
    ids = prompt(svc, "cancel me")
    handle = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=400, ignore_eos=True))
    events = iter(handle)
    assert isinstance(next(events), TokenDelta)
    handle.cancel()
    rest = list(events)
    assert isinstance(rest[-1], RequestDone)
    assert rest[-1].choices[0].finish_reason == "canceled"
    assert len(rest[-1].choices[0].token_ids) < 400
    assert svc.engine.kv_blocks()[0] == 0


def test_engine_recovers_from_a_failed_step(svc):
    fired = threading.Event()

    def fault():
        if not fired.is_set():
            fired.set()
            raise RuntimeError("injected fault")

    ids = prompt(svc, "survive this")
    svc.engine.fault_hook = fault
    try:
        handle = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=8))
        with pytest.raises(EngineError, match="injected fault"):
            handle.result()
    finally:
        svc.engine.fault_hook = None
    assert len(gen(svc, ids, max_tokens=8)) == 8
    assert svc.engine.stats["failures"] >= 1


def test_stop_strings_are_never_emitted(svc):
    ids = prompt(svc, "stop test")
    full = svc.tokenizer.decode(list(gen(svc, ids, max_tokens=30)))
    stop = full[10:14]
    assert stop
    handle = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=30, ignore_eos=True,
                                                 stop_strings=(stop,)))
    events = list(handle)
    streamed = "".join(e.text for e in events if isinstance(e, TokenDelta))
    finished = [e for e in events if isinstance(e, ChoiceFinished)]
    assert streamed == full[: full.index(stop)]
    assert finished[0].finish_reason == "stop" and finished[0].stop_reason == stop
    assert stop not in streamed


def test_eos_and_stop_token_ids_end_the_choice(svc):
    ids = prompt(svc, "ends")
    tokens = gen(svc, ids, max_tokens=10)
    done, _ = P.collect(svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=10,
                                                            stop_token_ids=(tokens[3],))))
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and choice.token_ids == tokens[: tokens.index(tokens[3]) + 1]


def test_n_choices_best_of_and_logprobs(svc):
    ids = prompt(svc, "choices")
    req = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=1.0, seed=5, logprobs=True,
                                                                     top_logprobs=3),
                            max_tokens=6, n=3, ignore_eos=True, logprobs=True, top_logprobs=3)
    done, lps = P.collect(svc.engine.submit(req))
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert len({c.token_ids for c in done.choices}) > 1
    for c in done.choices:
        entries = lps[c.index]
        assert [e[0] for e in entries] == list(c.token_ids)
        assert all(len(e[2]) == 3 and e[2][0][1] >= e[2][-1][1] for e in entries)
    best = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=1.0, seed=5), max_tokens=6,
                             n=1, best_of=3, ignore_eos=True)
    done, _ = P.collect(svc.engine.submit(best))
    assert len(done.choices) == 1 and done.usage.completion_tokens == 18


def test_bad_requests_fail_fast(svc):
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        svc.engine.submit(GenerationRequest(prompt_ids=[], sampling=GREEDY))
    with pytest.raises(ContextTooLong) as exc:
        svc.engine.submit(GenerationRequest(prompt_ids=[5] * 600, sampling=GREEDY))
    assert exc.value.n_prompt_tokens == 600 and exc.value.n_ctx == 512


def test_async_submission_from_an_event_loop(svc):
    async def main():
        loop = asyncio.get_running_loop()
        handles = [svc.engine.submit(GenerationRequest(prompt_ids=prompt(svc, f"async {i}"), sampling=GREEDY,
                                                       max_tokens=5, ignore_eos=True), loop=loop) for i in range(4)]
        return await asyncio.gather(*(h.aresult() for h in handles))

    results = asyncio.run(main())
    assert all(len(r.choices[0].token_ids) == 5 for r in results)


def test_failed_event_reaches_the_caller(svc):
    svc.engine.fault_hook = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        events = list(svc.engine.submit(GenerationRequest(prompt_ids=[3, 4, 5], sampling=GREEDY, max_tokens=2)))
    finally:
        svc.engine.fault_hook = None
    assert isinstance(events[-1], RequestFailed)


def test_fp8_kv_cache_runs_and_stays_close(model_dir, svc):
    ids = prompt(svc, "fp8 cache please")
    fp8 = service(model_dir, pa_cache_type="f8e4m3")
    try:
        assert fp8.backend.k_cache[0].dtype == torch.float8_e4m3fn
        tokens = gen(fp8, ids, max_tokens=8)
    finally:
        fp8.shutdown()
    assert len(tokens) == 8
    assert tokens[:2] == gen(svc, ids, max_tokens=2)  # lossy storage, same leading choices


@pytest.mark.parametrize("seed", range(5))
def test_grammar_constrains_what_a_random_model_writes(svc, seed):
    import json
    import re

    import jsonschema

    from mistralrs.engine.constraints import GrammarSpec

    ids = prompt(svc, "give me data")
    sampling = SamplingParams(temperature=1.0, seed=seed)
    done, _ = P.collect(svc.engine.submit(GenerationRequest(
        prompt_ids=ids, sampling=sampling, max_tokens=60, grammar=GrammarSpec("regex", r"[a-c]{3}-[0-9]{2,4}"))))
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2,4}", done.choices[0].text)
    assert done.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    done, _ = P.collect(svc.engine.submit(GenerationRequest(
        prompt_ids=ids, sampling=sampling, max_tokens=200, grammar=GrammarSpec("json_schema", schema))))
    jsonschema.validate(json.loads(done.choices[0].text), schema)


def test_invalid_grammar_is_rejected_at_submission(svc):
    from mistralrs.engine.constraints import ConstraintError, GrammarSpec

    with pytest.raises(ConstraintError):
        svc.engine.submit(GenerationRequest(prompt_ids=[3, 4], sampling=GREEDY, grammar=GrammarSpec("regex", "([a-")))


def test_a_request_that_cannot_start_fails_alone(svc, monkeypatch):
    ids = prompt(svc, "admission")
    real = svc.engine._encode_plain

    def broken(text):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(svc.engine, "_encode_plain", broken)
    bad = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(dry_multiplier=0.5),
                                              max_tokens=4))
    with pytest.raises(EngineError, match="could not start generation"):
        bad.result()
    monkeypatch.setattr(svc.engine, "_encode_plain", real)
    assert len(gen(svc, ids, max_tokens=4)) == 4


def test_request_log_records_requests_and_responses(model_dir, tmp_path):
    import json

    from mistralrs.cli import main

    log = tmp_path / "requests.jsonl"
    assert main(["--log", str(log), "--seed", "3", "run", "-m", str(model_dir), "--dtype", "f32",
                 "--max-tokens", "5", "-i", "hello"]) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["type"] for r in lines] == ["request", "response"]
    assert lines[0]["request_id"] == lines[1]["request_id"] and "hello" in lines[0]["prompt"]
    assert 1 <= lines[1]["usage"]["completion_tokens"] <= 5
    assert lines[1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_grammar_that_rejects_its_own_token_ends_only_that_choice(svc):
    from mistralrs.engine.constraints import GrammarSpec

    ids = prompt(svc, "grammar edge")
    other = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=GREEDY, max_tokens=12, ignore_eos=True))
    odd = svc.engine.submit(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=1.0, seed=1),
                                              max_tokens=12, grammar=GrammarSpec("lark", 'start: "<think>" /[a-z]+/')))
    done = odd.result()
    assert done.choices[0].finish_reason in ("stop", "length")
    assert len(other.result().choices[0].token_ids) == 12


def test_service_runs_a_warm_up_forward_at_load(model_dir, monkeypatch):
    """Loading ends with a one-token forward (kernels built or loaded before the first request); a model
    that cannot run one fails at load with a one-line ModelLoadError, not at the first request."""
    from mistralrs.errors import ModelLoadError
    from mistralrs.nn.decoder import CausalLM

    calls = []
    real = CausalLM.forward

    def counting(self, input_ids, positions, batch):
        calls.append((input_ids.tolist(), batch.slot_mapping))
        return real(self, input_ids, positions, batch)

    monkeypatch.setattr(CausalLM, "forward", counting)
    s = service(model_dir, max_seqs=2)
    try:
        assert calls == [([0], None)]  # one token, no KV cache touched
        assert s.engine.kv_blocks()[0] == 0  # no KV block used
    finally:
        s.shutdown()

    def broken(self, input_ids, positions, batch):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(CausalLM, "forward", broken)
    with pytest.raises(ModelLoadError, match="one-token test forward failed .RuntimeError: kernel exploded") as exc:
        service(model_dir, max_seqs=2)
    assert "\n" not in str(exc.value)


def _native_bf16_linear() -> bool:
    from mistralrs.plugins import get_registry

    return not get_registry().kernel("linear_bf16", "cpu").reference


@pytest.mark.skipif(not _native_bf16_linear(),
                    reason="bf16 batch invariance comes from a native linear_bf16 kernel (avx512_bf16 or avx2)")
def test_bf16_tokens_do_not_depend_on_the_batch():
    """In bf16 (the default dtype on such CPUs) a greedy request gives the same tokens alone, beside 15
    others (prompts prefilled together, decode batched) and after a prefix-cache hit. The random demo
    model has many near-ties, so any batch-dependent rounding shows up (it did before the kernels were
    made batch-invariant)."""
    s = ModelService(ServiceOptions(model_id="demo", dtype="bf16", max_seqs=16, pa_blk_size=8))
    try:
        def prompt(seed, n=20):
            g = torch.Generator().manual_seed(seed)
            return torch.randint(10, 880, (n,), generator=g).tolist()

        def run(prompts):
            handles = [s.engine.submit(GenerationRequest(prompt_ids=p, sampling=GREEDY, max_tokens=32,
                                                         ignore_eos=True)) for p in prompts]
            return [P.collect(h)[0].choices[0].token_ids for h in handles]

        for k in range(6):
            target = prompt(k)
            alone = run([target])[0]
            crowd = run([target] + [prompt(1000 + 20 * k + i, 10 + i) for i in range(15)])[0]
            assert crowd == alone, f"prompt {k}: tokens changed when batched"
            assert run([target])[0] == alone, f"prompt {k}: tokens changed with a prefix-cache hit"
    finally:
        s.shutdown()


# -- one request's trouble stays with that request (issue 11) -------------------------------------
@pytest.mark.timeout(120)  # before the fix the plain request was never answered
def test_logprobs_and_plain_rows_share_a_step(svc):
    """A row that asked for logprobs beside one that did not: both finish (this crashed the step)."""
    with_lp = GenerationRequest(prompt_ids=prompt(svc, "with logprobs"), max_tokens=12, ignore_eos=True,
                                sampling=SamplingParams(temperature=0, logprobs=True, top_logprobs=2))
    plain = GenerationRequest(prompt_ids=prompt(svc, "plain"), sampling=GREEDY, max_tokens=6, ignore_eos=True)
    a, b = svc.engine.submit(with_lp), svc.engine.submit(plain)  # admitted together: one step
    (done_a, lps_a), (done_b, lps_b) = P.collect(a), P.collect(b)
    assert [e[0] for e in lps_a[0]] == list(done_a.choices[0].token_ids) and all(len(e[2]) == 2 for e in lps_a[0])
    assert done_a.choices[0].cumulative_logprob == pytest.approx(sum(e[1] for e in lps_a[0]))
    assert lps_b.get(0, []) == [] and len(done_b.choices[0].token_ids) == 6


@pytest.mark.timeout(120)
def test_cancelling_a_logprobs_request_beside_a_plain_one(svc):
    """A client disconnect finishes the choice from the inbox; that must not kill the engine thread."""
    with_lp = GenerationRequest(prompt_ids=prompt(svc, "cancel me"), max_tokens=400, ignore_eos=True,
                                sampling=SamplingParams(temperature=0, logprobs=True))
    plain = GenerationRequest(prompt_ids=prompt(svc, "keep me"), sampling=GREEDY, max_tokens=40, ignore_eos=True)
    failures = svc.engine.stats["failures"]
    a, b = svc.engine.submit(with_lp), svc.engine.submit(plain)
    for event in a:
        if isinstance(event, TokenDelta):
            a.cancel()
            break
    done, _ = P.collect(b)
    assert len(done.choices[0].token_ids) == 40
    assert svc.engine._thread.is_alive() and svc.engine.stats["failures"] == failures
    assert gen(svc, prompt(svc, "after"), max_tokens=3)


def _unchecked(params: SamplingParams, **values) -> SamplingParams:
    """Params carrying values the validators refuse, as a buggy caller or plugin might build."""
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize("bad", [
    {"temperature": float("nan")},
    {"presence_penalty": float("nan")},
    {"repetition_penalty": 1e300},
], ids=["temperature-nan", "presence-nan", "repetition-1e300"])
@pytest.mark.timeout(120)
def test_a_request_that_breaks_sampling_fails_alone(svc, bad):
    ids = prompt(svc, "a good neighbour")
    seeded = SamplingParams(temperature=0.9, seed=7)  # sampled, so a failed batch draw would show
    alone = gen(svc, ids, max_tokens=10, sampling=seeded)
    used_before = svc.engine.kv_blocks()[0]
    failures = svc.engine.stats["failures"]
    broken = GenerationRequest(prompt_ids=prompt(svc, "broken"), max_tokens=10,
                               sampling=_unchecked(SamplingParams(temperature=0.8, seed=1), **bad))
    good = GenerationRequest(prompt_ids=ids, sampling=seeded, max_tokens=10, ignore_eos=True)
    h_bad, h_good = svc.engine.submit(broken), svc.engine.submit(good)
    with pytest.raises(EngineError, match="sampling failed"):
        h_bad.result()
    assert P.collect(h_good)[0].choices[0].token_ids == alone
    assert svc.engine.stats["failures"] == failures  # no step failed: only that request did
    assert svc.engine.kv_blocks()[0] <= used_before


def test_sampling_values_that_cannot_be_sampled_are_refused():
    for bad in ({"temperature": float("nan")}, {"top_p": float("inf")}, {"frequency_penalty": float("nan")},
                {"repetition_penalty": 0}, {"dry_base": 0.5}, {"logit_bias": {"5": float("nan")}}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_logit_bias_outside_the_vocabulary_is_refused_at_submission(svc):
    with pytest.raises(InvalidRequest, match="logit_bias") as exc:
        svc.engine.submit(GenerationRequest(prompt_ids=prompt(svc, "x"),
                                            sampling=SamplingParams(logit_bias={10**20: 1.0})))
    assert exc.value.param == "logit_bias"
