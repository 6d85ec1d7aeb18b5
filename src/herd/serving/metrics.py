"""GET /metrics: the engine's state (read at each scrape) and the server's own counters, in
Prometheus' text format. Each app has its own registry, so several servers (tests) live in one
process."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds over which herd_generation_tokens_per_second averages.
RATE_WINDOW_S = 10.0
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# engine stats key -> (metric name, help, kind)
_ENGINE_METRICS = {
    "running": ("herd_requests_running", "Requests the engine is decoding now.", "gauge"),
    "waiting": ("herd_requests_waiting", "Requests waiting for the engine.", "gauge"),
    "kv_blocks_used": ("herd_kv_blocks_used", "Paged KV blocks in use.", "gauge"),
    "kv_blocks_total": ("herd_kv_blocks_total", "Paged KV blocks in the store.", "gauge"),
    "prefix_cache_queries": ("herd_prefix_cache_queries", "Prompt blocks looked up in the prefix cache.", "counter"),
    "prefix_cache_hits": ("herd_prefix_cache_hits", "Prompt blocks found in the prefix cache.", "counter"),
    "generated_tokens": ("herd_engine_generated_tokens", "Tokens the engine generated.", "counter"),
    "preemptions": ("herd_preemptions", "Requests preempted when KV blocks ran out.", "counter"),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.stats = stats

    def collect(self):
        values = self.stats()
        for key, (name, help_text, kind) in _ENGINE_METRICS.items():
            family = GaugeMetricFamily(name, help_text) if kind == "gauge" else CounterMetricFamily(name, help_text)
            family.add_metric([], float(values.get(key, 0.0)))
            yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.requests = Counter("herd_http_requests", "API requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.in_flight = Gauge("herd_http_requests_in_flight", "API requests being answered now.",
                               registry=self.registry)
        self.prompt_tokens = Counter("herd_prompt_tokens", "Prompt tokens of the requests.", registry=self.registry)
        self.generation_tokens = Counter("herd_generation_tokens", "Tokens sent back to clients.",
                                         registry=self.registry)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "From the request to its first token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("herd_request_latency_seconds", "From the request to its last token.",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        Gauge("herd_generation_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
              registry=self.registry).set_function(self.tokens_per_second)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def count_tokens(self, count: int = 1) -> None:
        self.generation_tokens.inc(count)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
