"""Prometheus metrics of one server (`GET /metrics`): requests, queue depth, time to first token, inter-token
latency, tokens and tokens per second, KV-cache use and prefix-cache hits. One registry per app, so several
servers can live in one process (the tests)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from camelid.serve.engine import Metrics

disable_created_metrics()  # no *_created series: scrapers compute rates from the counters themselves

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics(Metrics):
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("camelid_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("camelid_time_to_first_token_seconds", "Time from submission to the first new token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("camelid_inter_token_latency_seconds", "Time between two tokens of one sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("camelid_sequence_seconds", "Time from submission to the end of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("camelid_prompt_tokens", "Prompt tokens prefilled or found cached", registry=r)
        self.cached_tokens = Counter("camelid_prompt_tokens_cached", "Prompt tokens found in the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("camelid_generation_tokens", "Tokens generated", registry=r)
        self.finished_sequences = Counter("camelid_sequences_finished", "Sequences finished, by reason", ["reason"],
                                          registry=r)
        self.queue_depth = Gauge("camelid_queue_depth", "Sequences waiting for a slot", registry=r)
        self.running = Gauge("camelid_sequences_running", "Sequences holding a KV-cache slot", registry=r)
        self.kv_usage = Gauge("camelid_kv_cache_usage_ratio", "Fraction of the KV cache's positions in use", registry=r)
        self.tokens_per_second = Gauge("camelid_generation_tokens_per_second",
                                       "Generated tokens per second over the last 10 seconds", registry=r)
        self.prefix_hits = Gauge("camelid_prefix_cache_hit_ratio", "Prompts that found a cached prefix / lookups",
                                 registry=r)
        self._recent: deque[float] = deque()  # times of recent generated tokens
        self._lock = threading.Lock()

    # -- engine callbacks (engine thread) ---------------------------------------------------------------------
    def time_to_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, prompt: int, generated: int, cached: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if cached:
            self.cached_tokens.inc(cached)
        if generated:
            self.generated_tokens.inc(generated)
            with self._lock:
                self._recent.append(time.monotonic())

    def finished(self, reason: str, seconds: float) -> None:
        self.finished_sequences.labels(reason).inc()
        self.e2e.observe(seconds)

    # -- scrape --------------------------------------------------------------------------------------------------
    def render(self, engine_state: Callable[[], dict[str, float]]) -> bytes:
        state = engine_state()
        self.queue_depth.set(state["queue_depth"])
        self.running.set(state["running"])
        self.kv_usage.set(state["kv_usage"])
        self.prefix_hits.set(state["prefix_hit_ratio"])
        with self._lock:
            cutoff = time.monotonic() - 10.0
            while self._recent and self._recent[0] < cutoff:
                self._recent.popleft()
            self.tokens_per_second.set(len(self._recent) / 10.0)
        return generate_latest(self.registry)
