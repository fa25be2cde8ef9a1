"""Prometheus metrics of the services through Ray Serve's metrics API (scraped from each Ray
node's metrics endpoint). Outside a Ray worker (plain-class tests) every call is a no-op.

Knows metric names and buckets; nothing of when they are recorded."""
from __future__ import annotations

import logging

log = logging.getLogger("medusa.services.metrics")

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
ACCEPTED_BUCKETS = [1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6]


class Metrics:
    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            try:
                import ray

                enabled = ray.is_initialized()
            except ImportError:
                enabled = False
        self.enabled = False
        if not enabled:
            return
        try:
            from ray.serve.metrics import Counter, Gauge, Histogram
        except ImportError:  # pragma: no cover
            return
        self._tokens = Counter("medusa_generated_tokens", "Tokens generated", tag_keys=("tenant",))
        self._requests = Counter("medusa_requests", "Requests by final status", tag_keys=("tenant", "code"))
        self._ttft = Histogram("medusa_time_to_first_token_seconds", "Time to first token", boundaries=TTFT_BUCKETS, tag_keys=("tenant",))
        self._itl = Histogram("medusa_inter_token_latency_seconds", "Seconds between streamed tokens", boundaries=ITL_BUCKETS)
        self._accepted = Histogram("medusa_accepted_length", "Tokens accepted per verification step", boundaries=ACCEPTED_BUCKETS)
        self._queue = Gauge("medusa_engine_queue_depth", "Requests running or waiting in an engine replica")
        self._redis = Counter("medusa_redis_unavailable", "Redis calls skipped or failed", tag_keys=("component",))
        self._routes = Counter("medusa_session_routes", "Routing decisions", tag_keys=("reason",))
        self.enabled = True

    def tokens(self, tenant: str, n: int) -> None:
        if self.enabled and n:
            self._tokens.inc(n, tags={"tenant": tenant})

    def request(self, tenant: str, code: str) -> None:
        if self.enabled:
            self._requests.inc(1, tags={"tenant": tenant or "-", "code": code})

    def ttft(self, tenant: str, seconds: float) -> None:
        if self.enabled:
            self._ttft.observe(seconds, tags={"tenant": tenant})

    def inter_token(self, seconds: float) -> None:
        if self.enabled:
            self._itl.observe(seconds)

    def accepted_length(self, value: float) -> None:
        if self.enabled and value > 0:
            self._accepted.observe(value)

    def queue_depth(self, n: int) -> None:
        if self.enabled:
            self._queue.set(n)

    def redis_unavailable(self, component: str) -> None:
        if self.enabled:
            self._redis.inc(1, tags={"component": component})

    def route(self, reason: str) -> None:
        if self.enabled:
            self._routes.inc(1, tags={"reason": reason})
