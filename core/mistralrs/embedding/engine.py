"""The embedding engine: one thread that runs every embedding request's sequences through the
model in batches. Requests that arrive together share forwards: the thread takes everything
queued, sorts the sequences by length (little padding) and runs them in batches of at most
`max_batch_tokens` padded tokens; each request gets its rows back when its last batch is done.

A batch is a flat `AttentionBatch` without a KV cache; encoders (``model.bidirectional``) get
a non-causal one. When a forward shared by several requests fails, each request's sequences
run again on their own, so only the request that breaks it fails; the thread goes on."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any

import attrs

log = logging.getLogger("mistralrs.embedding")


@attrs.define(eq=False)
class _Job:
    seqs: list[list[int]]
    skip: list[int]
    future: concurrent.futures.Future
    rows: list[Any] = attrs.Factory(list)
    left: int = 0


class EmbeddingEngine:
    def __init__(self, model: Any, backend: Any, pipeline: Any, *, device: Any, max_batch_tokens: int = 8192) -> None:
        self.model = model
        self.backend = backend
        self.pipeline = pipeline
        self.device = device
        self.max_batch_tokens = max(int(max_batch_tokens), 1)
        self.causal = not bool(getattr(model, "bidirectional", False))
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mistralrs-embedding", daemon=True)
        self._thread.start()

    def submit(self, seqs: list[list[int]], skip: list[int] | None = None) -> concurrent.futures.Future:
        """Embed token sequences (`skip[i]`: leading prompt tokens left out of the pooling); the
        future's result is a float32 tensor [len(seqs), dimension]."""
        job = _Job(seqs, list(skip or [0] * len(seqs)), concurrent.futures.Future())
        job.rows = [None] * len(seqs)
        job.left = len(seqs)
        if not seqs:
            job.future.set_exception(ValueError("nothing to embed"))
        else:
            self._inbox.put(job)
        return job.future

    def embed(self, seqs: list[list[int]], skip: list[int] | None = None) -> Any:
        return self.submit(seqs, skip).result()

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            jobs = [first]
            while True:  # everything queued meanwhile joins this round
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._inbox.put(None)
                    break
                jobs.append(more)
            self._round(jobs)

    def _round(self, jobs: list[_Job]) -> None:
        items = sorted(((len(s), j, i) for j in jobs for i, s in enumerate(j.seqs)), key=lambda t: t[0])
        batch: list[tuple[int, _Job, int]] = []
        for item in items:
            if batch and (len(batch) + 1) * item[0] > self.max_batch_tokens:
                self._forward(batch)
                batch = []
            batch.append(item)
        if batch:
            self._forward(batch)

    def _forward(self, batch: list[tuple[int, _Job, int]]) -> None:
        import torch

        live = [b for b in batch if not b[1].future.done()]
        if not live:
            return
        try:
            lengths = [n for n, _, _ in live]
            ids = torch.tensor([t for _, j, i in live for t in j.seqs[i]], dtype=torch.long, device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
            starts = [0]
            for n in lengths:
                starts.append(starts[-1] + n)
            with torch.inference_mode():
                attn = self.backend.batch(starts, lengths, causal=self.causal)
                hidden = self.model.forward(ids, positions, attn)
                pooled = self.pipeline.pool(hidden, lengths, [j.skip[i] for _, j, i in live]).cpu()
        except Exception as exc:  # noqa: BLE001 - the requests in this batch fail, the engine goes on
            jobs = list(dict.fromkeys(job for _, job, _ in live))
            if len(jobs) > 1:  # find the request that breaks it: each on its own
                for job in jobs:
                    self._forward([b for b in live if b[1] is job])
                return
            log.warning("embedding forward failed: %s: %s", type(exc).__name__, exc)
            if not jobs[0].future.done():
                jobs[0].future.set_exception(exc)
            return
        for row, (_, job, i) in zip(pooled, live):
            if job.future.done():
                continue
            job.rows[i] = row
            job.left -= 1
            if job.left == 0:
                job.future.set_result(torch.stack(job.rows))
