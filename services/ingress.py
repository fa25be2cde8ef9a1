"""The gRPC face of the cluster (medusa.v1.Medusa): authenticates the tenant, checks the
request, asks the tokenizer deployment for ids, takes quota, looks up the session's replica
in Redis and streams the engine's tokens back as text deltas, then a Final message.

Every failure leaves as a status code with a one-line reason (never a stack trace):
AuthError -> UNAUTHENTICATED, QuotaError -> RESOURCE_EXHAUSTED, MedusaError -> INVALID_ARGUMENT, Serve
back-pressure or a deployment not running -> UNAVAILABLE (services.overload),
anything else -> INTERNAL. Deployment handles are duck-typed (`h.method.remote(...)`,
`h.options(stream=True)`), so services.local runs this class without Ray.

Knows the wire messages, tenancy and sessions; nothing of how engines decode."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from opentelemetry import trace

from medusa.errors import MedusaError, RequestError
from medusa.proto.v1 import medusa_pb2 as pb
from services import telemetry
from services.config import Settings
from services.detok import JsonDecoder, decode_delta
from services.metrics import Metrics
from services.overload import overloaded
from services.redis_guard import RedisGuard
from services.requests import input_of, parse_generate
from services.routing import SessionStore, engine_session_id
from services.stops import StopMatcher
from services.tenancy import AuthError, KeyStore, Quota, QuotaError, bearer_key

log = logging.getLogger("medusa.services.ingress")


class ServiceAbort(Exception):
    """Raised after the status code and reason are set on the gRPC context."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)  # both in args: Ray pickles the exception to the proxy
        self.code, self.details = code, details

    def __str__(self) -> str:
        return self.details


def _cause(e: BaseException) -> BaseException:
    """The user's exception behind a Ray task error (whose str() holds a traceback)."""
    return getattr(e, "cause", None) or e


STATUS = ((AuthError, grpc.StatusCode.UNAUTHENTICATED), (QuotaError, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (MedusaError, grpc.StatusCode.INVALID_ARGUMENT))


def status_for(e: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, ServiceAbort):
        return e.code, e.details
    if overloaded(e) is not None:
        return grpc.StatusCode.UNAVAILABLE, "the server is overloaded or not ready: retry later"
    root = _cause(e)
    for cls, code in STATUS:
        if isinstance(root, cls) or isinstance(e, cls):
            return code, str(root).splitlines()[0] if str(root) else cls.__name__
    log.error("request %s failed: %s", request_id, e, exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error (request {request_id})"


def abort(grpc_context, code: grpc.StatusCode, details: str):
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    raise ServiceAbort(code, details)


def _parent(grpc_context):
    """Trace context sent by the client (traceparent metadata), if any."""
    if grpc_context is None:
        return None
    md = {k: v for k, v in grpc_context.invocation_metadata() or () if k in ("traceparent", "tracestate")}
    return telemetry.extract(md) if md else None


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
        self.tracer = telemetry.setup("ingress", settings.tracing)
        self._model_info: dict | None = None
        self._detok = None

    async def _detokenizer(self):
        """detok(ids, prefix_offset, read_offset, final) -> (text, prefix, read): local with the
        decoder the Tokenizer deployment hands out (a call per chunk saved), else remote."""
        if self._detok is None:
            spec = None
            if self.settings.local_detokenize:
                try:
                    spec = await self.tokenizer.decoder_json.remote()
                except Exception as e:  # noqa: BLE001 - fall back to the remote path
                    log.warning("no local decoder (%s): detokenising through the Tokenizer deployment", _cause(e))
            if spec:
                dec = JsonDecoder(spec)

                async def detok(ids, p, r, final):
                    return decode_delta(dec, ids, p, r, final)
            else:
                async def detok(ids, p, r, final):
                    return await self.tokenizer.detokenize.remote(ids, p, r, final)
            self._detok = detok
        return self._detok

    async def _tenant(self, grpc_context) -> str:
        if not self.settings.require_auth:
            return "default"
        md = grpc_context.invocation_metadata() if grpc_context is not None else ()
        return await self.keys.tenant(bearer_key(md))

    # ----- Generate -----
    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        request_id = uuid.uuid4().hex
        with telemetry.server_span(self.tracer, "ingress.Generate", grpc_context, "Generate", _parent(grpc_context)) as span:
            span.set_attribute("medusa.request_id", request_id)
            tenant = ""
            try:
                tenant = await self._tenant(grpc_context)
                span.set_attribute("medusa.tenant", tenant)
                async for resp in self._generate(request, request_id, tenant, span):
                    yield resp
                self.metrics.request(tenant, "OK")
            except (GeneratorExit, asyncio.CancelledError):
                self.metrics.request(tenant, "CANCELLED")
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a status code
                code, details = status_for(e, request_id)
                span.set_status(trace.Status(trace.StatusCode.ERROR, details))
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                self.metrics.request(tenant, code.name)
                abort(grpc_context, code, details)

    async def _generate(self, request, request_id: str, tenant: str, span):
        spec = parse_generate(request, self.settings)
        telemetry.genai_request(span, operation="chat" if spec.messages is not None else "text_completion",
                                model=self._model_name(), max_tokens=spec.max_new_tokens, sampling=spec.sampling)
        enc = await self.tokenizer.encode.remote({"messages": spec.messages, "prompt": spec.prompt, "stop": spec.stop,
                                                  "trace": telemetry.inject()})
        prompt_ids = enc["prompt_ids"]
        span.set_attribute("medusa.prompt_tokens", len(prompt_ids))
        lease = await self.quota.acquire(tenant, len(prompt_ids) + spec.max_new_tokens)
        detok = await self._detokenizer()
        stops = StopMatcher(spec.stop)
        ids: list[int] = []
        stream = None
        try:
            with self.tracer.start_as_current_span("router") as rspan:
                hint = await self.sessions.get(tenant, spec.session_id) if spec.session_id else None
                rspan.set_attribute("medusa.session_replica", hint or "")
                payload = {
                    "request_id": request_id, "tenant": tenant, "prompt_ids": prompt_ids,
                    "max_new_tokens": spec.max_new_tokens, "sampling": spec.sampling,
                    "stop_sequences": enc["stop_sequences"], "speculation": spec.speculation,
                    "session": engine_session_id(tenant, spec.session_id) if spec.session_id else None,
                    "affinity": hint, "trace": telemetry.inject(),
                }
                stream = self.engine.options(stream=True).generate.remote(payload)
            t0 = time.perf_counter()
            prefix = read = 0
            replica = ""
            first = True
            async for ev in coalesce(stream):
                if "error" in ev:
                    raise RequestError(ev["message"])
                if first:
                    first = False
                    replica = ev.get("replica", "")
                    reason = "none" if not spec.session_id else ("affinity" if hint == replica else ("reassigned" if hint else "new"))
                    span.set_attribute("medusa.replica", replica)
                    span.set_attribute("medusa.route", reason)
                    self.metrics.route(reason)
                    self.metrics.ttft(tenant, time.perf_counter() - t0)
                    if spec.session_id and replica:
                        await self.sessions.put(tenant, spec.session_id, replica)
                new = ev["tokens"]
                fin = ev.get("finish_reason")
                if new:
                    ids.extend(new)
                    text, p, r = await detok(ids[prefix:], 0, read - prefix, fin is not None)
                    prefix, read = prefix + p, prefix + r
                    text, hit = stops.push(text)  # stop strings on text: trimmed, the engine request cancelled
                    yield pb.GenerateResponse(delta=pb.Delta(text=text, token_ids=new))
                    if hit:
                        yield self._final(ev, "stop", request_id, replica, len(prompt_ids), len(ids), span, tenant)
                        return
                if fin is not None:
                    tail = ""
                    if read < len(ids):
                        tail, _, _ = await detok(ids[prefix:], 0, read - prefix, True)
                    text, hit = stops.push(tail)
                    text += stops.flush()
                    fin = "stop" if hit else fin
                    if text:
                        yield pb.GenerateResponse(delta=pb.Delta(text=text))
                    if fin == "error":
                        raise RuntimeError("the engine failed on this request")
                    yield self._final(ev, fin, request_id, replica, len(prompt_ids), len(ids), span, tenant)
                    return
            raise RuntimeError("the engine stream ended without a finish reason")
        finally:
            if stream is not None and hasattr(stream, "cancel"):
                stream.cancel()
            await self.quota.release(lease, len(prompt_ids) + len(ids))

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
    async def _unary(self, name: str, grpc_context, fn):
        request_id = uuid.uuid4().hex
        with telemetry.server_span(self.tracer, f"ingress.{name}", grpc_context, name, _parent(grpc_context)):
            try:
                return await fn()
            except Exception as e:  # noqa: BLE001
                abort(grpc_context, *status_for(e, request_id))

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        async def run():
            await self._tenant(grpc_context)
            messages, text = input_of(request)
            enc = await self.tokenizer.encode.remote({"messages": messages, "prompt": text, "trace": telemetry.inject()})
            return pb.TokenizeResponse(token_ids=enc["prompt_ids"])
        return await self._unary("Tokenize", grpc_context, run)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        async def run():
            await self._tenant(grpc_context)
            if self._model_info is None:
                self._model_info = await self.engine.info.remote()
            i = self._model_info
            return pb.ListModelsResponse(models=[pb.ModelInfo(
                id=self.settings.model_id or i.get("id", ""), heads=i.get("heads", ""), tree=i.get("tree", ""),
                context_length=i.get("context_length", 0), vocab_size=i.get("vocab_size", 0))])
        return await self._unary("ListModels", grpc_context, run)

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        details = {"ingress": "ok"}
        for name, h in (("tokenizer", self.tokenizer), ("engine", self.engine)):
            try:
                details[name] = await asyncio.wait_for(_awaitable(h.health.remote()), 5.0)
            except Exception as e:  # noqa: BLE001
                details[name] = f"unavailable: {type(_cause(e)).__name__}"
        if self.redis is not None:
            pong = await self.redis.call("health", lambda r: r.ping(), False)
            details["redis"] = "ok" if pong else "unreachable (serving without affinity and quotas)"
        ok = details["tokenizer"] == "ok" and details["engine"] == "ok"
        return pb.HealthResponse(status=pb.HealthResponse.SERVING if ok else pb.HealthResponse.NOT_SERVING, details=details)

    def spans(self) -> list[dict]:
        return telemetry.finished_spans()


_DONE = object()


async def coalesce(stream):
    """The engine's events, read ahead in a task so the engine stream never waits on us, and
    merged (tokens concatenated, the first event's replica and the last one's finish reason and
    stats kept) when several arrived while we were busy, e.g. awaiting detokenisation. One
    detokenise call then covers them all."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for ev in stream:
                q.put_nowait(ev)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait(e)
            return
        q.put_nowait(_DONE)

    task = asyncio.create_task(pump())
    try:
        while True:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            merged = None
            for it in items:
                if it is _DONE or isinstance(it, Exception):
                    if merged is not None:
                        yield merged
                    if it is _DONE:
                        return
                    raise it
                if merged is None:
                    merged = dict(it, tokens=list(it.get("tokens", ())))
                else:
                    merged["tokens"].extend(it.get("tokens", ()))
                    merged.update({k: v for k, v in it.items() if k not in ("tokens", "replica")})
            yield merged
    finally:
        task.cancel()


async def _awaitable(x):
    return await x
