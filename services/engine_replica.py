"""One engine replica's logic: owns a batched medusa.decoding.engine.Engine, turns a request
payload (plain dict from the ingress) into an engine Request, and streams plain-dict events
back: {"admitted", "replica", "tokens": []} as soon as the engine took the request (so the
ingress can fail fast when no replica does), then {"tokens"}, and a last one with
"finish_reason" and "stats". Bad input comes back as one {"error": "invalid_argument",
"message"} event.

Kept sessions are shared fairly: each tenant owns at most `session_share` engine session slots
on this replica ("tenant/~k"); a tenant's new conversation beyond its share reuses its own least
recently used slot, so one tenant's sessions never evict another tenant's kept KV.

Spans: engine.prefill (submit -> first token) and engine.decode (first token -> end), children
of the caller's trace. Knows token ids only; nothing of text, tenants or Redis."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, replace
from typing import AsyncIterator

from opentelemetry import trace

from medusa.errors import MedusaError
from services import telemetry
from services.metrics import Metrics


def engine_request(payload: dict, eos: tuple[int, ...]):
    """Payload dict -> engine Request (raises RequestError on bad values)."""
    from medusa.decoding.engine import Request
    from medusa.decoding.sampling import SamplingParams

    return Request(
        prompt_ids=list(payload["prompt_ids"]),
        max_new_tokens=int(payload["max_new_tokens"]),
        sampling=SamplingParams(**payload.get("sampling", {})),
        stop_token_ids=tuple(payload["stop_token_ids"]) if payload.get("stop_token_ids") else (eos or None),
        stop_sequences=tuple(tuple(s) for s in payload.get("stop_sequences") or ()),
        speculation=payload.get("speculation", "auto"),
        session_id=payload.get("session"),
        **({"request_id": payload["request_id"]} if payload.get("request_id") else {}),
    )


class EngineReplica:
    def __init__(self, engine, *, replica_id: str, eos: tuple[int, ...] = (), info: dict | None = None,
                 tracing: str | None = None, metrics: Metrics | None = None, session_share: int = 4):
        self.engine = engine
        self.session_share = session_share
        self._slots: dict[str, OrderedDict[str, str]] = {}  # tenant -> session -> engine slot id, LRU first
        self.replica_id = replica_id
        self.eos = tuple(eos)
        self._info = dict(info or {})
        self.tracer = telemetry.setup("engine", tracing)
        self.metrics = metrics or Metrics(enabled=False)

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        ctx = telemetry.extract(payload.get("trace"))
        try:
            req = engine_request(payload, self.eos)
            if req.session_id is not None:
                req = replace(req, session_id=self.slot(payload.get("tenant", ""), req.session_id,
                                                        payload.get("session_share") or self.session_share))
            handle = self.engine.submit(req)
        except (MedusaError, TypeError, ValueError) as e:
            yield {"error": "invalid_argument", "message": str(e), "replica": self.replica_id}
            return
        self._engine_gauges()
        yield {"tokens": [], "admitted": True, "replica": self.replica_id}
        attrs = {"medusa.replica": self.replica_id, "medusa.tenant": payload.get("tenant", ""),
                 "medusa.prompt_tokens": len(payload["prompt_ids"])}
        prefill = self.tracer.start_span("engine.prefill", context=ctx, attributes=attrs)
        decode = None
        done = False
        first = True
        last = time.perf_counter()
        try:
            async for ev in handle:
                now = time.perf_counter()
                out: dict = {"tokens": list(ev.tokens)}
                if first:
                    out["replica"] = self.replica_id
                    prefill.end()
                    decode = self.tracer.start_span("engine.decode", context=trace.set_span_in_context(prefill, ctx), attributes=attrs)
                    first = False
                elif ev.tokens:
                    self.metrics.inter_token((now - last) / len(ev.tokens))
                last = now
                if ev.finish_reason is not None:
                    done = True
                    out["finish_reason"] = ev.finish_reason
                    if ev.stats is not None:
                        out["stats"] = asdict(ev.stats)
                        self._annotate(decode or prefill, ev.stats, ev.finish_reason)
                yield out
        finally:
            if not done:
                handle.cancel()  # the caller went away: free the KV slot now
            if first:
                prefill.end()
            if decode is not None:
                decode.end()
            self._engine_gauges()

    def _engine_gauges(self) -> None:
        self.metrics.queue_depth(self.engine.load())
        if self.metrics.enabled:
            self.metrics.engine_state(self.engine.stats())

    def _depth(self, tree: str) -> int:
        t = getattr(self.engine, "trees", {}).get(tree) if tree and tree != "ar" else None
        return int(getattr(t, "accept_depth", 0) or 0) if t is not None else 0

    def slot(self, tenant: str, session: str, share: int) -> str:
        """The engine session id for (tenant, session): one of the tenant's `share` slots, the
        session's own while it is among the tenant's most recent, else the tenant's least
        recently used one (whose KV, if kept, is the only one the new conversation replaces)."""
        slots = self._slots.setdefault(tenant, OrderedDict())
        if session in slots:
            slots.move_to_end(session)
            return slots[session]
        if len(slots) < max(1, share):
            used = set(slots.values())
            sid = next(f"{tenant}/~{k}" for k in range(len(slots) + 1) if f"{tenant}/~{k}" not in used)
        else:
            _, sid = slots.popitem(last=False)
        slots[session] = sid
        return sid

    def _annotate(self, span, stats, finish_reason: str = "") -> None:
        span.set_attribute("medusa.completion_tokens", stats.new_tokens)
        span.set_attribute("medusa.reused_tokens", stats.reused_tokens)
        span.set_attribute("medusa.steps", stats.steps)
        span.set_attribute("medusa.mean_accepted", float(stats.mean_accepted))
        span.set_attribute("medusa.tree", stats.tree)
        self.metrics.accepted_length(float(stats.mean_accepted))
        self.metrics.finished(prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens, reused_tokens=stats.reused_tokens,
                              finish_reason=finish_reason, seconds=stats.seconds, ttft_s=stats.ttft_s, steps=stats.steps,
                              mean_accepted=float(stats.mean_accepted), draft_depth=self._depth(stats.tree))

    def info(self) -> dict:
        return dict(self._info, replica=self.replica_id)

    def load(self) -> int:
        return self.engine.load()

    def stats(self, route: dict | None = None) -> dict:
        """The engine's counters; `route` ({"affinity": replica id}) only steers the call to
        that replica (services.router), so a caller can read every replica's counters."""
        return dict(self.engine.stats(), replica=self.replica_id)

    def spans(self) -> list[dict]:
        return telemetry.finished_spans()

    def health(self) -> str:
        return "ok"
