"""One engine replica's logic: owns a batched medusa.decoding.engine.Engine, turns a request
payload (plain dict from the ingress) into an engine Request, and streams plain-dict events
back: {"admitted", "replica", "tokens": []} as soon as the engine took the request (so the
ingress can fail fast when no replica does), then {"tokens"} (with "logprobs" when the request
asked: services.logprobs.to_event), and a last one with
"finish_reason" and "stats". Bad input comes back as one {"error": "invalid_argument",
"message"} event.

Kept sessions are shared fairly: each tenant owns at most `session_share` engine session slots
on this replica ("tenant/~k"); a tenant's new conversation beyond its share reuses its own least
recently used slot, so one tenant's sessions never evict another tenant's kept KV.

Spans: engine.prefill (submit -> first token) and engine.decode (first token -> end), children
of the caller's trace. Knows token ids only; nothing of text, tenants or Redis."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from typing import AsyncIterator

from opentelemetry import trace

from medusa.errors import MedusaError
from services import telemetry
from services.logprobs import to_event
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
        logprobs=payload.get("logprobs"),
        **(payload.get("beams") or {}),  # beams, length_penalty, early_stopping, num_return
        **({"request_id": payload["request_id"]} if payload.get("request_id") else {}),
    )


log = logging.getLogger("medusa.engine")


def engine_sizes(settings, model, heads, tree, mem_get_info=None) -> tuple[dict, dict | None]:
    """(Engine keyword arguments max_batch / kv_budget_tokens / max_seq_len, the KV plan as a
    dict or None) for these settings. With gpu_memory_utilization the KV pool is sized from the
    device's memory now that the weights are loaded (medusa.model.memory.plan_kv); otherwise
    max_batch rows (default 8), as before. `mem_get_info() -> (free, total)` bytes defaults to
    torch.cuda.mem_get_info on the model's device."""
    from medusa.decoding.engine import DEFAULT_MAX_SEQ_LEN
    from medusa.model.memory import MAX_BATCH_CAP, plan_kv, step_reserve_bytes

    if settings.gpu_memory_utilization is None:
        return {"max_batch": settings.batch_limit, "max_seq_len": settings.max_seq_len}, None
    cfg = model.cfg
    if mem_get_info is None:
        import torch

        mem_get_info = lambda: torch.cuda.mem_get_info(model.device)  # noqa: E731
    free, total = mem_get_info()
    max_seq_len = min(settings.max_seq_len or DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    nodes = max(getattr(tree, "num_nodes", 1), 64)  # the engine may add trees up to 64 nodes
    row_tokens = max_seq_len + nodes + 1  # the engine's row_len
    elt = model.dtype.itemsize
    per_token = cfg.kv_bytes_per_token * elt // 2
    extra = 0
    if heads is not None and heads.config.head_type == "hydra++":  # prefix layer KV + pending hidden states (lazy HydraState)
        extra = row_tokens * (2 * cfg.num_kv_heads * cfg.head_dim + cfg.hidden_size) * elt
    batch = settings.max_batch or MAX_BATCH_CAP
    reserve = step_reserve_bytes(batch, nodes, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, elt)
    plan = plan_kv(total, free, settings.gpu_memory_utilization, per_token, row_tokens, max_seq_len,
                   reserve_bytes=reserve, max_batch=settings.max_batch, extra_row_bytes=extra)
    log.warning("medusa engine: %s", plan.describe())
    kwargs = {"max_batch": plan.max_batch, "kv_budget_tokens": plan.kv_budget_tokens, "max_seq_len": max_seq_len}
    return kwargs, dict(plan.as_dict(), gpu_memory_utilization=settings.gpu_memory_utilization)


class EngineReplica:
    def __init__(self, engine, *, replica_id: str, eos: tuple[int, ...] = (), info: dict | None = None,
                 tracing: str | None = None, metrics: Metrics | None = None, kv_plan: dict | None = None,
                 session_share: int = 4):
        self.engine = engine
        self.kv_plan = dict(kv_plan) if kv_plan else None  # the memory-derived KV sizes, when sized so
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
                if ev.logprobs is not None:  # one [logprob, [[id, logprob], ...]] per token
                    out["logprobs"] = to_event(ev.logprobs)
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
                    if ev.beams is not None:  # beam search: the num_return best
                        out["beams"] = [{"tokens": list(h.tokens), "score": h.score} for h in ev.beams]
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
                              mean_accepted=float(stats.mean_accepted), draft_depth=self._depth(stats.tree),
                              queue_s=getattr(stats, "queue_s", None))

    def info(self) -> dict:
        return dict(self._info, replica=self.replica_id)

    def load(self) -> int:
        return self.engine.load()

    def stats(self, route: dict | None = None) -> dict:
        """The engine's counters (and the memory-derived KV plan, when sized so); `route`
        ({"affinity": replica id}) only steers the call to that replica (services.router), so a
        caller can read every replica's counters."""
        out = dict(self.engine.stats(), replica=self.replica_id)
        if self.kv_plan is not None:
            out["kv_plan"] = dict(self.kv_plan)
        return out

    def spans(self) -> list[dict]:
        return telemetry.finished_spans()

    def health(self) -> str:
        return "ok"
