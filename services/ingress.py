"""The request path of the cluster (medusa.v1.Medusa), shared by both faces (gRPC through
Serve's gRPC proxy, HTTP through services.openai_api): authenticates the tenant, checks the
request, asks the tokenizer deployment for ids, takes quota, looks up the session's replica
in Redis and streams the engine's tokens back (read through services.engine_events) as text
deltas (services.textstream), then a Final message.

Every failure leaves as a status code with a one-line reason (never a stack trace) and, where
a retry may succeed, trailing metadata `retry-after-ms` (services.limits.status_for), set on
the gRPC context by services.grpc_status.fail so that Serve logs no traceback for an expected
rejection (a failed Generate sends one empty GenerateResponse, with no event, to carry the
status through Serve's proxy). Deployment handles are duck-typed (`h.method.remote(...)`,
`h.options(stream=True)`), so services.local runs this class without Ray.

Knows the wire messages, tenancy and sessions; nothing of how engines decode."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from opentelemetry import trace

from medusa.errors import RequestError
from medusa.proto.v1 import medusa_pb2 as pb
from services import limits, telemetry
from services.config import Settings
from services.engine_events import coalesce
from services.grpc_status import ServiceAbort, fail  # noqa: F401 - ServiceAbort: importable from here, as before
from services.grpc_wire import Malformed
from services.limits import Admission, BadRequest, Unavailable, cause
from services.logprobs import LogprobStream
from services.metrics import Metrics
from services.redis_guard import RedisGuard
from services.requests import input_of, parse_generate
from services.routing import SessionStore, engine_session_id
from services.stops import StopMatcher
from services.tenancy import KeyStore, Quota, bearer_key
from services.textstream import TextStream

log = logging.getLogger("medusa.services.ingress")


_cause = cause


class Ingress:
    def __init__(self, tokenizer, engine, settings: Settings, *, metrics: Metrics | None = None,
                 redis: RedisGuard | None = None):
        self.tokenizer = tokenizer
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or Metrics(enabled=False)
        self.redis = redis if redis is not None else (RedisGuard(settings.redis_url, self.metrics) if settings.redis_url else None)
        self.keys = KeyStore.from_settings(settings, self.redis)
        self.quota = Quota(settings, self.redis)
        self.sessions = SessionStore(self.redis, settings.session_ttl_s)
        self.admission = Admission(settings)
        self.tracer = telemetry.setup("ingress", settings.tracing)
        self._model_info: dict | None = None
        self.text = TextStream(tokenizer, settings.local_detokenize)

    async def _tenant(self, grpc_context) -> str:
        if not self.settings.require_auth:
            return "default"
        md = grpc_context.invocation_metadata() if grpc_context is not None else ()
        return await self.keys.tenant(bearer_key(md))

    async def _info(self) -> dict:
        if self._model_info is None:
            timeout = self.settings.admit_timeout_s or None
            try:
                self._model_info = await asyncio.wait_for(_awaitable(self.engine.info.remote()), timeout)
            except asyncio.TimeoutError:
                raise Unavailable(f"no engine replica answered within {timeout:g}s; retry later") from None
        return self._model_info

    async def _encode(self, req: dict) -> dict:
        """The Tokenizer deployment's encode; bad input comes back as {"error"} (not raised, so
        Serve logs no traceback) and becomes INVALID_ARGUMENT here."""
        enc = await self.tokenizer.encode.remote(dict(req, trace=telemetry.inject()))
        if "error" in enc:
            raise BadRequest(enc["error"])
        return enc

    async def served_models(self) -> list[str]:
        i = await self._info()
        return [n for n in dict.fromkeys((self.settings.model_id, i.get("id", ""))) if n]

    # ----- Generate -----
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        request_id = uuid.uuid4().hex
        with telemetry.server_span(self.tracer, "ingress.Generate", grpc_context, "Generate",
                                   telemetry.client_parent(grpc_context)) as span:
            span.set_attribute("medusa.request_id", request_id)
            tenant = ""
            entered = False
            try:
                if isinstance(request, Malformed):
                    raise BadRequest(request.reason)
                limits.check_size(request, self.settings)
                tenant = await self._tenant(grpc_context)
                span.set_attribute("medusa.tenant", tenant)
                cut = self.admission.enter(tenant, request_id)
                entered = True
                async for resp in self._generate(request, request_id, tenant, span, cut):
                    yield resp
                self.metrics.request(tenant, "OK")
            except (GeneratorExit, asyncio.CancelledError):
                self.metrics.request(tenant, "CANCELLED")
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a status code
                st = limits.status_for(e, request_id, self.settings)
                span.set_status(trace.Status(trace.StatusCode.ERROR, st.details))
                span.set_attribute("rpc.grpc.status_code", st.code.value[0])
                self.metrics.request(tenant, st.code.name)
                fail(grpc_context, st)
                # Serve's proxy copies the context's status only along with a message: one empty
                # GenerateResponse (no event) carries it. Clients skip messages without an event.
                yield pb.GenerateResponse()
            finally:
                if entered:
                    self.admission.leave(request_id)

    async def _generate(self, request, request_id: str, tenant: str, span, cut: asyncio.Event):
        spec = parse_generate(request, self.settings)
        telemetry.genai_request(span, operation="chat" if spec.messages is not None else "text_completion",
                                model=self._model_name(), max_tokens=spec.max_new_tokens, sampling=spec.sampling)
        limits.check_model(request.model, await self.served_models())
        await self.quota.precheck(tenant, spec.max_new_tokens + 1)  # before paying for tokenisation
        enc = await self._encode({"messages": spec.messages, "prompt": spec.prompt, "stop": spec.stop})
        prompt_ids = enc["prompt_ids"]
        span.set_attribute("medusa.prompt_tokens", len(prompt_ids))
        max_new = limits.room_for(spec.max_new_tokens, len(prompt_ids), (await self._info()).get("context_length"))
        lease = await self.quota.acquire(tenant, len(prompt_ids) + max_new)
        detok = await self.text.detokenizer()
        stops = StopMatcher(spec.stop)
        lp = LogprobStream() if spec.logprobs is not None else None  # entries follow their text through `stops`
        ids: list[int] = []
        stream = None
        try:
            with self.tracer.start_as_current_span("router") as rspan:
                hint = await self.sessions.get(tenant, spec.session_id) if spec.session_id else None
                rspan.set_attribute("medusa.session_replica", hint or "")
                lim = self.settings.limits_for(tenant)
                payload = {
                    "request_id": request_id, "tenant": tenant, "prompt_ids": prompt_ids,
                    "max_new_tokens": max_new, "sampling": spec.sampling,
                    "stop_sequences": enc["stop_sequences"], "speculation": spec.speculation,
                    "session": engine_session_id(tenant, spec.session_id) if spec.session_id else None,
                    "session_share": lim.max_sessions or self.settings.sessions_per_tenant,
                    "affinity": hint, "trace": telemetry.inject(), "logprobs": spec.logprobs,
                    "beams": spec.beams,
                }
                stream = self.engine.options(stream=True).generate.remote(payload)
            t0 = time.perf_counter()
            prefix = read = 0
            replica = ""
            first = True
            async for ev in self._events(stream, cut):
                await self.quota.renew(lease)
                if "error" in ev:
                    raise RequestError(ev["message"])
                if not replica and ev.get("replica"):
                    replica = ev["replica"]
                    span.set_attribute("medusa.replica", replica)
                new = ev.get("tokens") or []
                fin = ev.get("finish_reason")
                if first and (new or fin is not None):
                    first = False
                    self.admission.started(request_id)
                    reason = "none" if not spec.session_id else ("affinity" if hint == replica else ("reassigned" if hint else "new"))
                    span.set_attribute("medusa.route", reason)
                    self.metrics.route(reason)
                    self.metrics.ttft(tenant, time.perf_counter() - t0)
                    if spec.session_id and replica:
                        await self.sessions.put(tenant, spec.session_id, replica)
                if new:
                    ids.extend(new)
                    if lp is None:
                        text, p, r = await detok(ids[prefix:], 0, read - prefix, fin is not None)
                        prefix, read = prefix + p, prefix + r
                    else:
                        text, prefix, read = await self.text.lp_text(detok, ids, new, ev, prefix, read, fin is not None, lp,
                                                                     eos=fin == "eos")
                    text, hit = stops.push(text)  # stop strings on text: trimmed, the engine request cancelled
                    released = lp.release(len(text), matched=hit) if lp is not None else ()
                    yield pb.GenerateResponse(delta=pb.Delta(text=text, token_ids=new, logprobs=released))
                    if hit:
                        yield self._final(ev, "stop", request_id, replica, len(prompt_ids), len(ids), span, tenant)
                        return
                if fin is not None:
                    tail = ""
                    if read < len(ids):
                        tail, _, _ = await detok(ids[prefix:], 0, read - prefix, True)
                    text, hit = stops.push(tail)
                    held = stops.flush()
                    released = lp.release(len(text) + len(held), matched=hit, final=True) if lp is not None else ()
                    text += held
                    fin = "stop" if hit else fin
                    if text or released:
                        yield pb.GenerateResponse(delta=pb.Delta(text=text, logprobs=released))
                    if fin == "error":
                        raise RuntimeError("the engine failed on this request")
                    final = self._final(ev, fin, request_id, replica, len(prompt_ids), len(ids), span, tenant)
                    for b in ev.get("beams") or ():  # beam search: each returned beam with its text
                        text, _, _ = await detok(list(b["tokens"]), 0, 0, True)
                        final.final.beams.add(token_ids=b["tokens"], text=text, score=b["score"])
                    yield final
                    return
            raise Unavailable("the engine stream ended without a finish reason (replica lost); retry")
        finally:
            if stream is not None and hasattr(stream, "cancel"):
                stream.cancel()
            # Release now even if this task is cancelled again meanwhile (a cancelled stream must
            # not hold its tenant's slot; the lease's expiry is only the backstop).
            release = asyncio.ensure_future(self.quota.release(lease, len(prompt_ids) + len(ids)))
            try:
                await asyncio.shield(release)
            except asyncio.CancelledError:
                pass

    async def _events(self, stream, cut: asyncio.Event):
        """The engine's (coalesced) events; the first (the replica's admission) must come within
        admit_timeout_s, else UNAVAILABLE: no replica could take the request now."""
        it = coalesce(stream, cut).__aiter__()
        try:
            timeout = self.settings.admit_timeout_s or None
            try:
                ev = await asyncio.wait_for(it.__anext__(), timeout)
            except asyncio.TimeoutError:
                raise Unavailable(f"no engine replica accepted the request within {timeout:g}s; retry later") from None
            except StopAsyncIteration:
                return
            yield ev
            async for ev in it:
                yield ev
        finally:
            await it.aclose()

    def _final(self, ev, fin, request_id, replica, n_prompt, n_new, span, tenant) -> pb.GenerateResponse:
        st = ev.get("stats") or {}
        self.metrics.tokens(tenant, n_new)
        span.set_attribute("medusa.completion_tokens", n_new)
        span.set_attribute("medusa.mean_accepted", float(st.get("mean_accepted", 0.0)))
        telemetry.genai_response(span, response_id=request_id, model=self._model_name(), finish_reason=fin,
                                 input_tokens=st.get("prompt_tokens", n_prompt), output_tokens=n_new)
        return pb.GenerateResponse(final=pb.Final(
            finish_reason=fin, request_id=request_id, replica_id=replica,
            usage=pb.Usage(prompt_tokens=st.get("prompt_tokens", n_prompt), completion_tokens=n_new,
                           reused_prompt_tokens=st.get("reused_tokens", 0)),
            stats=pb.SpeculationStats(steps=st.get("steps", 0), mean_accepted=st.get("mean_accepted", 0.0),
                                      tree=st.get("tree", ""), ttft_s=st.get("ttft_s", 0.0), seconds=st.get("seconds", 0.0))))

    def _model_name(self) -> str:
        return self.settings.model_id or (self._model_info or {}).get("id", "")

    # ----- unary methods -----
    async def _unary(self, name: str, request, grpc_context, fn, empty):
        request_id = uuid.uuid4().hex
        with telemetry.server_span(self.tracer, f"ingress.{name}", grpc_context, name, telemetry.client_parent(grpc_context)):
            try:
                if isinstance(request, Malformed):
                    raise BadRequest(request.reason)
                return await fn()
            except Exception as e:  # noqa: BLE001
                fail(grpc_context, limits.status_for(e, request_id, self.settings))
                return empty

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        async def run():
            limits.check_size(request, self.settings)
            tenant = await self._tenant(grpc_context)
            if self.admission.draining:
                raise Unavailable("the server is shutting down; retry on another instance", 0.5)
            messages, text = input_of(request)
            enc = await self._encode({"messages": messages, "prompt": text})
            await self.quota.charge(tenant, len(enc["prompt_ids"]))
            return pb.TokenizeResponse(token_ids=enc["prompt_ids"])
        return await self._unary("Tokenize", request, grpc_context, run, pb.TokenizeResponse())

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        async def run():
            await self._tenant(grpc_context)
            i = await self._info()
            return pb.ListModelsResponse(models=[pb.ModelInfo(
                id=self.settings.model_id or i.get("id", ""), heads=i.get("heads", ""), tree=i.get("tree", ""),
                context_length=i.get("context_length", 0), vocab_size=i.get("vocab_size", 0))])
        return await self._unary("ListModels", request, grpc_context, run, pb.ListModelsResponse())

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        details = {"ingress": "draining" if self.admission.draining else "ok",
                   "ingress_in_flight": str(len(self.admission.in_flight))}
        for name, h in (("tokenizer", self.tokenizer), ("engine", self.engine)):
            try:
                details[name] = await asyncio.wait_for(_awaitable(h.health.remote()), 5.0)
            except Exception as e:  # noqa: BLE001
                details[name] = f"unavailable: {type(_cause(e)).__name__}"
        if details["engine"] == "ok":
            try:  # one replica's counters (the leak check of the reliability suite reads every replica's)
                st = await asyncio.wait_for(_awaitable(self.engine.stats.remote()), 5.0)
                for k in ("running", "waiting", "load", "kv_rows_used", "sessions_kept"):
                    if k in st:
                        details[f"engine_{k}"] = str(st[k])
            except Exception:  # noqa: BLE001 - counters are optional
                pass
        if self.redis is not None:
            pong = await self.redis.call("health", lambda r: r.ping(), False)
            details["redis"] = "ok" if pong else "unreachable (serving without affinity and quotas)"
        ok = details["tokenizer"] == "ok" and details["engine"] == "ok" and not self.admission.draining
        return pb.HealthResponse(status=pb.HealthResponse.SERVING if ok else pb.HealthResponse.NOT_SERVING, details=details)

    async def drain(self, grace_s: float | None = None) -> dict:
        """Stop admitting (new requests: UNAVAILABLE), let in-flight streams finish for up to
        grace_s (default: the drain_grace_s setting), then cut the rest with UNAVAILABLE."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        out = await self.admission.drain(grace)
        log.warning("drained: %s", out)
        return out

    def spans(self) -> list[dict]:
        return telemetry.finished_spans()


async def _awaitable(x):
    return await x
