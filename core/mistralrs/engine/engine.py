"""The engine: one model, many requests, continuous batching in a background thread.

Requests are submitted from any thread or asyncio loop and stream events back through a
`RequestHandle` (the request and event types are in `engine.requests`). The engine thread
loops: take new requests and cancellations, schedule a step (chunked prefill + decode under a
token budget), run the model, sample, detokenize, check stops, emit deltas. A failure stays
with the request that caused it where it can (docs/engine.md, "Recovery"); if the forward pass
itself raises, every in-flight request fails and the engine carries on with a clean state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable

import attrs

from mistralrs.engine.kv_cache import BlockPool, StateSlots
from mistralrs.engine.requests import (  # noqa: F401 - re-exported: the engine's public request/event types
    ChoiceFinished,
    ContextTooLong,
    GenerationRequest,
    RequestDone,
    RequestFailed,
    RequestHandle,
    TokenDelta,
    Usage,
)
from mistralrs.engine.scheduler import Scheduler
from mistralrs.engine.sequence import Sequence, Status
from mistralrs.errors import InvalidRequest, MistralRsError

log = logging.getLogger("mistralrs.engine")


@attrs.define
class _RequestState:
    request: GenerationRequest
    handle: RequestHandle
    seqs: list[Sequence]
    arrival: float
    cache_key: Any = None
    mm: tuple[Any, ...] = ()  # the request's images (MmItem); their embeddings are computed once, in mm_embeds
    mm_embeds: dict[int, Any] = attrs.field(factory=dict)
    first_token: float | None = None
    prefill_done: float | None = None
    finished: dict[int, ChoiceFinished] = attrs.field(factory=dict)


# -- configuration --------------------------------------------------------------------------
@attrs.define(kw_only=True)
class EngineConfig:
    max_seqs: int = 16
    max_num_batched_tokens: int = 4096
    block_size: int = 32
    num_blocks: int | None = None  # None: sized from the pa_* options / defaults
    prefix_cache_n: int = 16
    no_kv_cache: bool = False
    seed: int | None = None
    max_model_len: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.block_size not in (8, 16, 32):
            raise InvalidRequest("block size must be 8, 16 or 32", "pa_blk_size")
        if self.max_seqs < 1:
            raise InvalidRequest("max_seqs must be at least 1", "max_seqs")
        if self.max_num_batched_tokens < 1:
            raise InvalidRequest("max_num_batched_tokens must be at least 1", "max_num_batched_tokens")


class EngineError(MistralRsError):
    """Generation failed inside the engine (a bug or out of memory); the engine recovered."""


class Engine:
    def __init__(
        self,
        model: Any,
        backend: Any,
        tokenizer: Any,
        *,
        config: EngineConfig,
        eos_token_ids: tuple[int, ...] = (),
        generation_defaults: Any = None,
        device: Any = "cpu",
        vocab_size: int | None = None,
        request_log: Any = None,
    ) -> None:
        from mistralrs.engine.runner import ModelRunner
        from mistralrs.engine.sampling import Sampler

        self.config = config
        self.model = model
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.generation_defaults = generation_defaults
        self.max_model_len = config.max_model_len
        self.vocab_size = vocab_size
        states = None if config.no_kv_cache else getattr(backend, "states", None)
        prefix_n = config.prefix_cache_n
        if states is not None and prefix_n:
            # a recurrent layer's state after a cached prefix is not kept, so a hit could not restore it
            log.info("prefix caching is off: the model has recurrent layers")
            prefix_n = 0
        from mistralrs.engine import decode_graphs

        # Decode graphs (CUDA graphs; op replay on the CPU), on by default where they are safe: on CUDA their
        # padding rows get a block of their own, kept out of the pool (the CPU plan does not pad)
        self.graphs_off = ("no KV cache" if config.no_kv_cache
                           else "no max_model_len" if config.max_model_len is None
                           else decode_graphs.why_not(backend, device))
        graph_block = 1 if self.graphs_off is None and decode_graphs.pads(device) else 0
        pool = None if config.no_kv_cache else BlockPool(backend.num_blocks - graph_block, backend.block_size, prefix_n)
        self.scheduler = Scheduler(pool, max_seqs=config.max_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                   state_slots=StateSlots(states.num_slots) if states is not None else None)
        self.runner = ModelRunner(model, backend, device)
        if self.graphs_off is None:
            assert config.max_model_len is not None
            self.runner.graphs = decode_graphs.DecodeGraphs(model, backend, device, max_seqs=config.max_seqs,
                                                            max_model_len=config.max_model_len,
                                                            pad_block=backend.num_blocks - 1 if graph_block else None)
        log.info("decode graphs: %s", "on" if self.graphs_off is None else f"off ({self.graphs_off})")
        self.sampler = Sampler()
        self._seed_counter = itertools.count()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._states: dict[int, _RequestState] = {}  # seq id -> state
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._constraints: Any = None
        self.request_log = request_log  # request_log.RequestLog or None
        self.fault_hook: Callable[[], None] | None = None  # tests inject failures here
        self.stats = {"steps": 0, "computed_tokens": 0, "requests": 0, "failures": 0, "recoveries": 0}

    # -- public API ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Pass the running asyncio loop to consume events with `async for`."""
        self._validate(request)
        if request.grammar is not None and request.compiled_grammar is None:
            # Compile in the caller's thread: a bad grammar is the caller's 400, and the
            # engine thread never stalls on compilation.
            request.compiled_grammar = self.constraint_factory().compile(request.grammar)
        handle = RequestHandle(self, request, loop)
        if self.request_log is not None:
            self.request_log.request(request)
        self._ensure_thread()
        self._inbox.put(("submit", handle))
        self._wake.set()
        return handle

    def call_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two steps (e.g. re-quantizing the model): queued
        and running requests wait for it and then continue. The future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ensure_thread()
        self._inbox.put(("call", (fn, future)))
        self._wake.set()
        return future

    def constraint_factory(self) -> Any:
        with self._thread_lock:
            if self._constraints is None:
                from mistralrs.engine.constraint_factory import ConstraintFactory

                vocab = self.vocab_size or self.tokenizer.vocab_size
                self._constraints = ConstraintFactory(self.tokenizer, vocab, eos_token_ids=sorted(self.eos_token_ids) or None)
            return self._constraints

    def shutdown(self, timeout: float | None = 10) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()

    def kv_blocks(self) -> tuple[int, int]:
        """(used, total) KV blocks."""
        pool = self.scheduler.pool
        return (pool.num_used(), pool.num_blocks) if pool else (0, 0)

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty; send at least one token", "prompt")
        vocab = self.vocab_size or getattr(self.tokenizer, "vocab_size", None)
        if vocab and (max(request.prompt_ids) >= vocab or min(request.prompt_ids) < 0):
            raise InvalidRequest(f"the prompt contains token ids outside the vocabulary (0..{vocab - 1})", "prompt")
        bias = getattr(request.sampling, "logit_bias", ())
        if vocab and any(not 0 <= token < vocab for token, _ in bias):
            raise InvalidRequest(f"logit_bias names token ids outside the vocabulary (0..{vocab - 1})", "logit_bias")
        if request.n < 1 or (request.best_of is not None and request.best_of < request.n):
            raise InvalidRequest("n must be >= 1 and best_of >= n", "n")
        if request.max_tokens is not None and request.max_tokens < 0:
            raise InvalidRequest("max_tokens must be >= 0", "max_tokens")
        limit = self.max_model_len
        if limit is not None and len(request.prompt_ids) >= limit:
            raise ContextTooLong(len(request.prompt_ids), limit)
        pool = self.scheduler.pool
        if pool is not None:
            need = pool.blocks_for(len(request.prompt_ids) + 1)
            if need > pool.num_blocks:
                raise InvalidRequest(
                    f"the prompt needs {need} KV-cache blocks but the pool has {pool.num_blocks}; "
                    "raise --pa-context-len / --pa-memory-mb or shorten the prompt",
                    "messages",
                )

    # -- the engine thread --------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:
                    log.error("engine thread had died; restarting it")
                    self._fail_all(EngineError("the engine thread died; the request was dropped"))
                    self.stats["recoveries"] += 1
                self._thread = threading.Thread(target=self._loop, name="mistralrs-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._drain_inbox()
            except Exception as exc:  # noqa: BLE001 - never let the engine thread die
                log.error("engine inbox handling failed; failing in-flight requests:\n%s", traceback.format_exc())
                self.stats["failures"] += 1
                self._fail_all(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            if not self.scheduler.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                if self.fault_hook is not None:
                    self.fault_hook()
                self.step()
            except Exception as exc:  # noqa: BLE001 - recover: fail in-flight requests, keep serving
                log.error("engine step failed; failing in-flight requests and recovering:\n%s", traceback.format_exc())
                self.stats["failures"] += 1
                self._fail_all(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
        self._drain_inbox()
        self._fail_all(EngineError("the engine is shutting down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                try:
                    self._admit(handle)
                except Exception as exc:  # noqa: BLE001 - this request's problem only
                    log.error("could not admit request %s:\n%s", handle.id, traceback.format_exc())
                    self._fail_handle(handle, EngineError(f"could not start generation: {type(exc).__name__}: {exc}"))
            elif kind == "call":
                fn, future = handle
                if future.set_running_or_notify_cancel():
                    if self.runner.graphs is not None:  # e.g. new weights: the graphs read the old tensors
                        self.runner.graphs.reset()
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # noqa: BLE001 - the caller's problem, reported to it
                        future.set_exception(exc)
            elif kind == "cancel":
                try:
                    self._abort(handle, "canceled")
                except Exception as exc:  # noqa: BLE001 - this request's problem only
                    log.error("could not cancel request %s:\n%s", handle.id, traceback.format_exc())
                    self._fail_handle(handle, EngineError(f"cancellation failed: {type(exc).__name__}: {exc}"))

    def _admit(self, handle: RequestHandle) -> None:
        from mistralrs.engine.sampling_state import SequenceSamplingState
        from mistralrs.tokenization import IncrementalDetokenizer, StopStringMatcher

        req = handle.request
        if handle.cancelled:
            handle.done = True
            handle._put(RequestFailed(EngineError("the request was cancelled")))
            return
        state = _RequestState(req, handle, [], time.perf_counter(), cache_key=req.cache_key, mm=tuple(req.mm))
        params = req.sampling
        if self.generation_defaults is not None:
            params = params.with_defaults(self.generation_defaults)
        if req.ranks_candidates or req.reports_logprobs:
            # best_of ranks its candidates by cumulative logprob, so they need one per token.
            params = attrs.evolve(params, logprobs=True, top_logprobs=max(params.top_logprobs, req.top_logprobs))
        count = req.best_of or req.n
        for i in range(count):
            seq = Sequence(request=state, prompt_ids=list(req.prompt_ids), index=i, arrival=state.arrival)
            seed = params.seed
            if seed is not None and count > 1:
                seed = seed + 7919 * i  # distinct choices, still reproducible
            fallback = None if self.config.seed is None else self.config.seed + next(self._seed_counter)
            seq.params = params if seed == params.seed else attrs.evolve(params, seed=seed)
            seq.sampling_state = SequenceSamplingState.for_request(
                seq.params, seq.prompt_ids, fallback_seed=fallback, tokenizer_encode=self._encode_plain,
            )
            seq.detok = IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=req.skip_special_tokens, prompt_ids=req.prompt_ids
            )
            seq.stopper = StopStringMatcher(req.stop_strings) if req.stop_strings else None
            if req.compiled_grammar is not None:
                seq.constraint = self.constraint_factory().new_state(req.compiled_grammar)
            state.seqs.append(seq)
            self._states[seq.id] = state
            self.scheduler.add(seq)
        self.stats["requests"] += 1
        if req.max_tokens == 0:
            for seq in state.seqs:
                self._finish(seq, "length")

    def _encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _cancel(self, handle: RequestHandle) -> None:
        self._inbox.put(("cancel", handle))
        self._wake.set()

    def _abort(self, handle: RequestHandle, reason: str) -> None:
        for seq_id, state in list(self._states.items()):
            if state.handle is handle:
                seq = next(s for s in state.seqs if s.id == seq_id)
                if not seq.finished:
                    self._finish(seq, reason)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> None:
        step = self.scheduler.schedule()
        if not step:
            self._fail_unschedulable()
            return
        logits, sampling_idx = self.runner.forward(step)
        self.stats["steps"] += 1
        for item in step:
            item.seq.computed_total += item.num_tokens
            self.stats["computed_tokens"] += item.num_tokens
            item.seq.num_computed += item.num_tokens
            self.scheduler.register_full_blocks(item.seq)
        if not sampling_idx:
            return
        seqs = [step[i].seq for i in sampling_idx]
        results = self._sample(logits, seqs)
        now = time.perf_counter()
        for seq, result in zip(seqs, results):
            state: _RequestState = seq.request
            if seq.finished:  # another choice of its request failed earlier in this loop
                continue
            if isinstance(result, BaseException):
                self._fail_state(state, result)
                continue
            if state.first_token is None:
                state.first_token = now
            try:
                self._append(seq, *result)
            except Exception as exc:  # noqa: BLE001 - this request's problem only
                log.error("request %s failed after sampling:\n%s", state.request.id, traceback.format_exc())
                self._fail_state(state, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
        if self.scheduler.pool is None:
            for item in step:
                item.seq.num_computed = 0

    def _sample(self, logits: Any, seqs: list[Sequence]) -> list[Any]:
        """(token, logprob or None, top logprobs) per row, sampled as one batch. If the batch
        fails, row by row: a row that still fails becomes its request's error, so values that
        break sampling (or a broken grammar) fail only the request that sent them."""
        # The batch may draw from some rows' generators before it fails; the retry restores them,
        # so a seeded request's tokens do not depend on a neighbour failing.
        rng = [s.sampling_state.generator.get_state() for s in seqs] if len(seqs) > 1 else []
        try:
            return self._sample_batch(logits, seqs)
        except Exception:  # noqa: BLE001 - find the row at fault below
            if len(seqs) == 1:
                log.error("request %s: sampling failed:\n%s", seqs[0].request.request.id, traceback.format_exc())
            else:
                log.warning("batched sampling failed; sampling row by row:\n%s", traceback.format_exc())
        if len(seqs) == 1:
            results: list[Any] = [None]
        else:
            results = []
            for seq, state in zip(seqs, rng):
                seq.sampling_state.generator.set_state(state)
            for row, seq in enumerate(seqs):
                try:
                    results += self._sample_batch(logits[row : row + 1], [seq])
                except Exception:  # noqa: BLE001 - this request's problem only
                    log.error("request %s: sampling failed:\n%s", seq.request.request.id, traceback.format_exc())
                    results.append(None)
        return [
            EngineError("sampling failed for this request (see the server log)") if r is None else r
            for r in results
        ]

    def _sample_batch(self, logits: Any, seqs: list[Sequence]) -> list[tuple[int, float | None, tuple]]:
        mask = None
        if any(s.constraint is not None for s in seqs):
            from mistralrs.engine.constraint_masks import batch_masks

            mask = batch_masks([s.constraint for s in seqs], logits.shape[1])
        out = self.sampler.sample(
            logits, [s.params for s in seqs], [s.sampling_state for s in seqs], allowed_mask=mask
        )
        # Rows that did not ask for logprobs get None even when another row did.
        logprobs: list[float | None] = out.logprobs or [None] * len(seqs)
        tops: list[Any] = out.top_logprobs or [[] for _ in seqs]
        return [(token, lp, tuple(top)) for token, lp, top in zip(out.token_ids, logprobs, tops)]

    def _append(self, seq: Sequence, token: int, logprob: float | None, top: tuple) -> None:
        state: _RequestState = seq.request
        req = state.request
        seq.output_ids.append(token)
        seq.sampling_state.append(token)
        lp = None
        if logprob is not None:
            lp = (token, logprob, top)
            seq.logprobs.append(lp)
        # Stop tokens end the choice without emitting their text.
        if token in req.stop_token_ids or (token in self.eos_token_ids and not req.ignore_eos):
            self._finish(seq, "stop", stop_reason=token)
            return
        grammar_done = False
        if seq.constraint is not None:
            try:
                seq.constraint.advance(token)
                grammar_done = seq.constraint.is_finished()
            except Exception as exc:  # noqa: BLE001 - the grammar engine disagreed with its own mask
                # End this choice only; the batch goes on.
                log.warning("request %s: grammar rejected token %d it had allowed (%s); ending the choice",
                            req.id, token, exc)
                grammar_done = True
        delta = seq.detok.step(token)
        stopped = False
        if seq.stopper is not None and delta:
            check = seq.stopper.feed(delta)
            delta, stopped = check.text, check.stopped
        seq.text += delta
        # Every token is an event, also one whose text is held back (an incomplete UTF-8 sequence, a possible
        # stop string): streams start and token metrics count when generation does. best_of candidates stay
        # hidden: the winners are sent whole when all are done.
        if not req.ranks_candidates:
            state.handle._put(TokenDelta(seq.index, delta, (token,), (lp,) if lp and req.reports_logprobs else ()))
        if stopped:
            self._finish(seq, "stop", stop_reason=seq.stopper.stop_string)
        elif grammar_done:
            self._finish(seq, "stop")
        elif req.max_tokens is not None and len(seq.output_ids) >= req.max_tokens:
            self._finish(seq, "length")
        elif self.max_model_len is not None and len(seq) >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: Any = None) -> None:
        state: _RequestState = seq.request
        stopper = seq.stopper
        if seq.detok is not None and reason in ("length", "stop") and not (stopper and stopper.stopped):
            # Emit what the detokenizer and the stop matcher were holding back.
            tail = seq.detok.flush()
            if stopper is not None:
                check = stopper.feed(tail) if tail else None
                tail = (check.text if check else "") + ("" if stopper.stopped else stopper.flush())
            if tail:
                seq.text += tail
                if not state.request.ranks_candidates:
                    state.handle._put(TokenDelta(seq.index, tail, ()))
        self.scheduler.finish(seq, reason)
        self._states.pop(seq.id, None)
        cum = sum(lp[1] for lp in seq.logprobs) if seq.logprobs else None
        choice = ChoiceFinished(seq.index, reason, seq.text, tuple(seq.output_ids), stop_reason, cum)
        state.finished[seq.index] = choice
        req = state.request
        best_of = req.best_of or req.n
        if not req.ranks_candidates:
            state.handle._put(choice)
        if len(state.finished) == best_of:
            self._complete(state)

    def _complete(self, state: _RequestState) -> None:
        req = state.request
        choices = sorted(state.finished.values(), key=lambda c: c.index)
        if req.best_of and req.best_of > req.n:
            ranked = sorted(choices, key=lambda c: -(c.cumulative_logprob or 0.0))[: req.n]
            choices = [attrs.evolve(c, index=i) for i, c in enumerate(ranked)]
            for c in choices:
                state.handle._put(TokenDelta(c.index, c.text, c.token_ids))
                state.handle._put(c)
        now = time.perf_counter()
        cached = max((s.cached_tokens for s in state.seqs), default=0)
        usage = Usage(
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=sum(len(s.output_ids) for s in state.seqs),
            cached_tokens=cached,
            time_to_first_token=None if state.first_token is None else state.first_token - state.arrival,
            prompt_seconds=None if state.first_token is None else state.first_token - state.arrival,
            completion_seconds=None if state.first_token is None else now - state.first_token,
            total_seconds=now - state.arrival,
        )
        state.handle.done = True
        done = RequestDone(usage, tuple(choices))
        if self.request_log is not None:
            self.request_log.response(req, done)
        state.handle._put(done)

    def _fail_unschedulable(self) -> None:
        """Nothing could be scheduled: the head of the queue does not fit even alone."""
        if self.scheduler.running or not self.scheduler.waiting:
            return
        seq = self.scheduler.waiting[0]
        self._fail_state(seq.request, EngineError("the request does not fit in the KV cache; raise --pa-context-len"))

    def _fail_handle(self, handle: RequestHandle, error: BaseException) -> None:
        state = next((st for st in self._states.values() if st.handle is handle), None)
        if state is not None:
            self._fail_state(state, error)
        elif not handle.done:
            handle.done = True
            handle._put(RequestFailed(error))

    def _fail_state(self, state: _RequestState, error: BaseException) -> None:
        for seq in state.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "error")
            self._states.pop(seq.id, None)
        if not state.handle.done:
            state.handle.done = True
            if self.request_log is not None:
                self.request_log.error(state.request, error)
            state.handle._put(RequestFailed(error))

    def _fail_all(self, error: BaseException) -> None:
        # Every request with a sequence anywhere, even one whose bookkeeping a failure left half done.
        seqs = [*self._states.values(), *(s.request for s in (*self.scheduler.running, *self.scheduler.waiting))]
        states = {id(s): s for s in seqs}
        self.scheduler.clear()
        self._states.clear()
        for state in states.values():
            for seq in state.seqs:
                seq.status = Status.FINISHED
            if not state.handle.done:
                state.handle.done = True
                if self.request_log is not None:
                    self.request_log.error(state.request, error)
                state.handle._put(RequestFailed(error))
