"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Names follow mistral.rs (`http_requests_total`, `mistralrs_time_to_first_token_seconds`, ...).
Counters and histograms are updated by the request handlers; engine gauges are read from
the engine when /metrics is scraped.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any, Callable, Iterable

# Buckets: HTTP latency; TTFT and inter-token latency as vLLM's, with finer low ends for CPUs.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        if not self.values:
            yield f"{self.name} 0"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(key)} {_num(value)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.series: dict[Labels, list[Any]] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0] * len(self.buckets) + [0.0, 0]
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def count(self, **labels: str) -> int:
        s = self.series.get(tuple(sorted(labels.items())))
        return s[-1] if s else 0

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        series = self.series or {(): [0] * len(self.buckets) + [0.0, 0]}
        for key, s in sorted(series.items()):
            running = 0
            for bound, n in zip(self.buckets, s):
                running += n
                yield f"{self.name}_bucket{_labels(key, (('le', _num(bound)),))} {running}"
            yield f"{self.name}_bucket{_labels(key, (('le', '+Inf'),))} {s[-1]}"
            yield f"{self.name}_sum{_labels(key)} {_num(s[-2])}"
            yield f"{self.name}_count{_labels(key)} {s[-1]}"


class Gauge:
    """A gauge whose value is read when scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float | None]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> Iterable[str]:
        try:
            value = self.read()
        except Exception:  # noqa: BLE001 - a half-built engine must not break the scrape
            value = None
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_num(float(value or 0))}"


class Metrics:
    """Every metric the server exports. `service` is read lazily (it may still be loading)."""

    def __init__(self, get_service: Callable[[], Any]) -> None:
        self.get_service = get_service
        self.in_flight = 0
        self.requests = Counter("http_requests_total", "HTTP requests by method, route and status.")
        self.duration = Histogram("http_request_duration_seconds",
                                  "HTTP request latency (until the last byte of a stream).", HTTP_BUCKETS)
        self.ttft = Histogram("mistralrs_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("mistralrs_inter_token_latency_seconds",
                             "Time between successive generated tokens of one choice.", ITL_BUCKETS)
        self.prompt_tokens = Counter("mistralrs_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("mistralrs_generation_tokens_total", "Tokens generated.")
        self.completed = Counter("mistralrs_sequences_completed_total", "Finished choices by finish reason.")
        self.cancelled = Counter("mistralrs_requests_cancelled_total",
                                 "Requests cancelled before the end (client gone, or cut off by a shutdown).")

        def engine(attr: str) -> Callable[[], float | None]:
            def read() -> float | None:
                svc = self.get_service()
                return None if svc is None else getattr(svc.engine, attr, None)  # None: an embedding engine
            return read

        def pool(read_pool: Callable[[Any], float]) -> Callable[[], float | None]:
            def read() -> float | None:
                svc = self.get_service()
                p = None if svc is None else getattr(getattr(svc.engine, "scheduler", None), "pool", None)
                return None if p is None else read_pool(p)
            return read

        self.gauges = [
            Gauge("http_requests_in_flight", "HTTP requests being served.", lambda: self.in_flight),
            Gauge("mistralrs_model_loaded", "1 once the model is loaded and serving.",
                  lambda: 0 if self.get_service() is None else 1),
            Gauge("mistralrs_sequences_running", "Sequences being generated.", engine("num_running")),
            Gauge("mistralrs_sequences_waiting", "Sequences waiting to be scheduled.", engine("num_waiting")),
            Gauge("mistralrs_kv_cache_blocks_used", "KV-cache blocks in use.", pool(lambda p: p.num_used())),
            Gauge("mistralrs_kv_cache_blocks_total", "KV-cache blocks in the pool.", pool(lambda p: p.num_blocks)),
            # Monotonic engine counters, exported as counters by `render`.
        ]
        self.engine_counters = [
            ("mistralrs_prefix_cache_hits_total", "Prompts that reused cached KV blocks.",
             pool(lambda p: getattr(p, "queries", 0))),
            ("mistralrs_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
             pool(lambda p: getattr(p, "hits", 0))),
        ]

    # -- recording --------------------------------------------------------------------------
    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.inc(method=method, path=path, status=str(status))
        self.duration.observe(seconds, method=method, path=path)

    def tracker(self, arrival: float) -> GenerationTracker:
        return GenerationTracker(self, arrival)

    # -- exposition -------------------------------------------------------------------------
    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.duration, self.ttft, self.itl, self.prompt_tokens,
                       self.generation_tokens, self.completed, self.cancelled):
            lines.extend(metric.render())
        for gauge in self.gauges:
            lines.extend(gauge.render())
        for name, help, read in self.engine_counters:
            try:
                value = read()
            except Exception:  # noqa: BLE001
                value = None
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {_num(float(value or 0))}"]
        return "\n".join(lines) + "\n"


class GenerationTracker:
    """Per-request timing: TTFT at the first token, inter-token latency per choice after."""

    def __init__(self, metrics: Metrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last: dict[int, float] = {}

    def token(self, index: int, count: int = 1) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
        prev = self.last.get(index)
        if prev is not None and count:
            self.metrics.itl.observe((now - prev) / count)
        self.last[index] = now

    def done(self, event: Any) -> None:
        usage = event.usage
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.generation_tokens.inc(usage.completion_tokens)
        for choice in event.choices:
            self.metrics.completed.inc(reason=str(choice.finish_reason))
