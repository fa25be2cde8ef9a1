"""Prometheus metrics of the services through Ray Serve's metrics API (scraped from each Ray
node's metrics endpoint; Ray adds the `ray_` prefix and Counters get `_total`). Outside a Ray
worker (plain-class tests) every call is a no-op.

Besides our own series, the ones vLLM users chart, with vLLM's meaning under our prefix
(`vllm:prompt_tokens_total` -> `ray_medusa_prompt_tokens_total`, ...; the README has the table).

Knows metric names and buckets; nothing of when they are recorded."""
from __future__ import annotations

import logging

log = logging.getLogger("medusa.services.metrics")

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
ACCEPTED_BUCKETS = [1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960]  # vLLM's e2e buckets


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
        # vLLM-equivalent series (engine replicas)
        self._prompt = Counter("medusa_prompt_tokens", "Prefill tokens processed (vllm:prompt_tokens)")
        self._generation = Counter("medusa_generation_tokens", "Generation tokens produced (vllm:generation_tokens)")
        self._success = Counter("medusa_request_success", "Finished requests by finish reason (vllm:request_success)",
                                tag_keys=("finished_reason",))
        self._e2e = Histogram("medusa_e2e_request_latency_seconds", "Submit to last token in the engine (vllm:e2e_request_latency_seconds)",
                              boundaries=LATENCY_BUCKETS)
        self._engine_ttft = Histogram("medusa_engine_time_to_first_token_seconds",
                                      "Submit to first token in the engine, queueing included (vllm:time_to_first_token_seconds)",
                                      boundaries=TTFT_BUCKETS)
        self._running = Gauge("medusa_num_requests_running", "Requests decoding in the engine (vllm:num_requests_running)")
        self._waiting = Gauge("medusa_num_requests_waiting", "Requests waiting for a KV row (vllm:num_requests_waiting)")
        self._kv = Gauge("medusa_kv_cache_usage_perc", "Share of KV rows in use or kept for sessions, 0-1 (vllm:kv_cache_usage_perc)")
        self._drafts = Counter("medusa_spec_decode_num_drafts", "Speculative verification steps (vllm:spec_decode_num_drafts)")
        self._draft_tokens = Counter("medusa_spec_decode_num_draft_tokens",
                                     "Draft tokens proposed: steps x the tree's acceptable depth (vllm:spec_decode_num_draft_tokens)")
        self._accepted_tokens = Counter("medusa_spec_decode_num_accepted_tokens",
                                        "Draft tokens accepted (vllm:spec_decode_num_accepted_tokens)")
        self._accepted_per_pos = Counter("medusa_spec_decode_num_accepted_tokens_per_pos",
                                         "Speculative steps that accepted a draft token at each draft position, from 0 "
                                         "(vllm:spec_decode_num_accepted_tokens_per_pos)", tag_keys=("position",))
        self._queue_time = Histogram("medusa_request_queue_time_seconds",
                                     "Submit to admission (prefill start) in the engine (vllm:request_queue_time_seconds)",
                                     boundaries=LATENCY_BUCKETS)
        self._pos_seen: list[int] = []  # the engine's cumulative per-position counts already exported
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

    def finished(self, *, prompt_tokens: int, new_tokens: int, reused_tokens: int, finish_reason: str,
                 seconds: float, ttft_s: float, steps: int, mean_accepted: float, draft_depth: int,
                 queue_s: float | None = None) -> None:
        """One engine request's end (vLLM's per-request series). Speculative steps are those of a
        request whose tree was not "ar"; draft_depth is the most candidates one step can accept."""
        if not self.enabled:
            return
        if prompt_tokens - reused_tokens > 0:
            self._prompt.inc(prompt_tokens - reused_tokens)
        if new_tokens:
            self._generation.inc(new_tokens)
        self._success.inc(1, tags={"finished_reason": finish_reason})
        self._e2e.observe(seconds)
        if queue_s is not None:
            self._queue_time.observe(queue_s)
        if new_tokens:
            self._engine_ttft.observe(ttft_s)
        if steps and draft_depth > 0:
            self._drafts.inc(steps)
            self._draft_tokens.inc(steps * draft_depth)
            accepted = max(0, round(mean_accepted * steps) - steps)  # tokens per step beyond the one every step makes
            if accepted:
                self._accepted_tokens.inc(accepted)

    def engine_state(self, stats: dict) -> None:
        """Gauges from Engine.stats(): running and waiting requests, KV rows in use; and the
        per-position acceptance counter, by what the engine's cumulative counts grew since the
        last call (one engine per replica, so one Metrics)."""
        if not self.enabled:
            return
        per_pos = stats.get("accepted_per_pos") or []
        self._pos_seen.extend([0] * (len(per_pos) - len(self._pos_seen)))
        for i, n in enumerate(per_pos):
            if n > self._pos_seen[i]:
                self._accepted_per_pos.inc(n - self._pos_seen[i], tags={"position": str(i)})
                self._pos_seen[i] = n
        self._running.set(stats.get("running", 0))
        self._waiting.set(stats.get("waiting", 0))
        rows = stats.get("kv_rows") or 0
        if rows:
            self._kv.set((stats.get("kv_rows_used", 0) + stats.get("kv_rows_kept", 0)) / rows)
