"""The OpenAI-compatible HTTP face of the ingress: POST /v1/chat/completions and
/v1/completions (JSON, or server-sent events with `stream: true`, ending in `data: [DONE]`),
GET /v1/models and GET /health, served from Ray Serve's HTTP proxy by the same Ingress that
serves gRPC.

Each HTTP request becomes a medusa.v1 GenerateRequest run through Ingress.Generate, so
authentication (`Authorization: Bearer <key>`, the gRPC tenants' keys), size limits, quota
leases, the bounded admission queue, drain, unknown models, session affinity, stop strings,
tracing and metrics are the gRPC path's, written once (services.ingress, services.limits).
The body's bytes are checked against max_request_bytes before it is parsed (413). Failures
come back in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) with the
HTTP status the gRPC code stands for (401, 400, 404 unknown model, 429 with Retry-After from
the retry hint, 503 with Retry-After).

Extra fields (ignored by clients that do not know them):
  request: `session_id` (or the `X-Session-Id` header) keeps the conversation's KV on one
  replica; `speculation`: "auto" | "on" | "off"; `beams` (beam search, greedy, not streamed;
  `n` <= beams returns that many beams as choices, best first), `length_penalty`,
  `early_stopping` (true | false | "never"); response: `medusa` {steps, mean_accepted,
  tree, ttft_s, seconds, replica_id, reused_prompt_tokens, beam_scores with beams}.

Knows HTTP, JSON and OpenAI's schema; nothing of tenants, engines or tokenizers."""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, AsyncIterator, Literal

import grpc
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from medusa.proto.v1 import medusa_pb2 as pb
from services import limits
from services.logprobs import MAX_TOP

MAX_LOGPROBS = MAX_TOP  # alternatives per token (OpenAI allows 20 for chat; the engine returns at most 5)


# ----------------------------------------------------------------- request models


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts are understood
            if any(p.get("type") != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not know are ignored, as OpenAI's own servers do

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    n: int = 1
    logprobs: bool | int | None = None  # chat: bool (with top_logprobs); completions: int 0-5
    top_logprobs: int | None = Field(None, ge=0)
    session_id: str | None = None
    speculation: Literal["auto", "on", "off"] | None = None
    # beam search extension (greedy; `n` <= beams choices, best first; not with stream / logprobs)
    beams: int | None = Field(None, ge=1)
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None


class ChatCompletionRequest(_Common):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[str]


SPECULATION = {None: pb.SPECULATION_AUTO, "auto": pb.SPECULATION_AUTO, "on": pb.SPECULATION_ON, "off": pb.SPECULATION_OFF}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def to_generate_request(body: _Common, session_header: str | None) -> pb.GenerateRequest:
    """An OpenAI request -> the medusa.v1 request the gRPC path runs."""
    beams = _beams(body)
    if body.n != 1 and not beams:
        raise BadRequest(f"n must be 1 (this server returns one choice; n up to beams with beam search), got {body.n}", "n")
    top = _logprobs(body)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = pb.SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                 top_p=body.top_p or 0.0)
    if body.seed is not None:
        sampling.seed = body.seed
    req = pb.GenerateRequest(model=body.model or "", session_id=session_header or body.session_id or "", sampling=sampling,
                             max_new_tokens=body.max_completion_tokens or body.max_tokens or 0,
                             stop=stops, speculation=SPECULATION[body.speculation])
    if top is not None:
        req.logprobs, req.top_logprobs = True, top
    if beams:
        req.sampling.temperature = 0.0  # beam search is greedy (a temperature > 0 was refused)
        req.beams, req.num_return = beams, body.n
        req.early_stopping = {True: "true", False: "false", "never": "never", None: ""}[body.early_stopping]
        if body.length_penalty is not None:
            req.length_penalty = body.length_penalty
    if isinstance(body, ChatCompletionRequest):
        try:
            msgs = [pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages]
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        req.chat.CopyFrom(pb.Conversation(messages=msgs))
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("prompt must be one string (batches of prompts are not supported)", "prompt")
            prompt = prompt[0]
        req.prompt = prompt
    return req


def _beams(body: _Common) -> int | None:
    """The beam count of a beam-search request (None: plain decoding); what beam search cannot
    do is a 400 naming the field."""
    if not body.beams or body.beams == 1:
        for name in ("length_penalty", "early_stopping"):
            if getattr(body, name) is not None:
                raise BadRequest(f"{name} needs beams > 1", name)
        return None
    if body.stream:
        raise BadRequest("beam search cannot stream: the best beam is known only at the end (use stream: false)", "stream")
    if body.temperature:
        raise BadRequest("beam search is greedy: temperature must be 0 or unset with beams", "temperature")
    if body.logprobs:
        raise BadRequest("logprobs are not supported with beam search", "logprobs")
    if not 1 <= body.n <= body.beams:
        raise BadRequest(f"n must be 1..beams ({body.beams}) with beam search, got {body.n}", "n")
    if body.length_penalty is not None and not math.isfinite(body.length_penalty):
        raise BadRequest("length_penalty must be a finite number", "length_penalty")
    return body.beams


def _logprobs(body: _Common) -> int | None:
    """The alternatives per token the request asks for, None without logprobs. Chat:
    `logprobs: true` and `top_logprobs` 0-5; completions: `logprobs` 0-5 (OpenAI's shapes)."""
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise BadRequest("logprobs must be true or false for chat completions (top_logprobs sets the alternatives)",
                             "logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        if not body.logprobs:
            return None
        top = body.top_logprobs or 0
        if top > MAX_LOGPROBS:
            raise BadRequest(f"top_logprobs must be at most {MAX_LOGPROBS} on this server, got {top}", "top_logprobs")
        return top
    if body.top_logprobs is not None:
        raise BadRequest("top_logprobs is a chat completions field; completions take logprobs: 0-"
                         f"{MAX_LOGPROBS}", "top_logprobs")
    if body.logprobs is None or body.logprobs is False:
        return None
    if isinstance(body.logprobs, bool) or not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise BadRequest(f"logprobs must be an integer 0-{MAX_LOGPROBS} for completions, got {body.logprobs!r}", "logprobs")
    return body.logprobs


# ----------------------------------------------------------------- errors

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
RETRY_AFTER_S = 1


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def http_error(st: limits.Status) -> tuple[int, dict, dict]:
    """(HTTP status, OpenAI error body, headers) of a status of the shared request path."""
    status, type_ = HTTP_STATUS.get(st.code, (500, "server_error"))
    headers = {}
    if status in (429, 503):
        wait_ms = st.retry_after_ms if st.retry_after_ms is not None else RETRY_AFTER_S * 1000
        headers["Retry-After"] = str(max(1, math.ceil(wait_ms / 1000)))
    code, param = ("model_not_found", "model") if st.code == grpc.StatusCode.NOT_FOUND else (st.code.name.lower(), None)
    return status, {"message": st.details, "type": type_, "param": param, "code": code}, headers


def error_of(e: BaseException, request_id: str, settings) -> tuple[int, dict, dict]:
    """(HTTP status, OpenAI error body, headers) for an exception of the request path."""
    return http_error(limits.status_for(e, request_id, settings))


def _json_error(err: tuple[int, dict, dict]) -> JSONResponse:
    status, body, headers = err
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# ----------------------------------------------------------------- the HTTP context


class HttpContext(limits.StatusRecorder):
    """What Ingress needs of a gRPC context, from an HTTP request: the Authorization and trace
    headers as metadata, and the server span's http.* attributes. The status the ingress sets
    (code, details, retry hint) is kept in `status` for the face to answer with, and the HTTP
    status it stands for is recorded on the current (ingress) span."""

    def __init__(self, request: Request, route: str):
        super().__init__()
        h = request.headers
        self._md = [(k, h[k]) for k in ("authorization", "traceparent", "tracestate") if k in h]
        self.http_attributes = {"http.request.method": request.method, "http.route": route, "url.path": request.url.path,
                                "url.scheme": request.url.scheme, "http.response.status_code": 200}
        if request.client is not None:
            self.http_attributes["client.address"] = request.client.host

    def invocation_metadata(self):
        return self._md

    def set_code(self, code):
        super().set_code(code)
        trace.get_current_span().set_attribute("http.response.status_code", HTTP_STATUS.get(code, (500,))[0])


# ----------------------------------------------------------------- responses

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _usage(final: pb.Final) -> dict:
    u = final.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.reused_prompt_tokens}}


def _extras(final: pb.Final) -> dict:
    st = final.stats
    return {"steps": st.steps, "mean_accepted": round(st.mean_accepted, 4), "tree": st.tree, "ttft_s": round(st.ttft_s, 4),
            "seconds": round(st.seconds, 4), "replica_id": final.replica_id,
            "reused_prompt_tokens": final.usage.reused_prompt_tokens, "finish_reason": final.finish_reason,
            "request_id": final.request_id}


def _chat_logprob(e: pb.TokenLogprob) -> dict:
    return {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8"))}


class _Shape:
    """The chat or the text-completion flavour of responses and chunks."""

    def __init__(self, chat: bool, model: str, request_id: str, logprobs: bool = False):
        self.chat, self.model, self.asked = chat, model, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, entries) -> dict | None:
        """OpenAI's `choices[].logprobs` for these medusa.v1 TokenLogprobs (None when not asked)."""
        if not self.asked:
            return None
        if self.chat:
            return {"content": [dict(_chat_logprob(e), top_logprobs=[_chat_logprob(t) for t in e.top_logprobs])
                                for e in entries]}
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
                "text_offset": [e.text_offset for e in entries]}

    def response(self, text: str, final: pb.Final, entries=()) -> dict:
        fin = FINISH.get(final.finish_reason, final.finish_reason)
        lp = self.logprobs(entries)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": fin}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": fin}
            out = self._head("text_completion")
        choices = [choice]
        for i, b in enumerate(final.beams[1:], 1):  # beam search: the other returned beams, best first
            choices.append(dict(choice, index=i, **({"message": {"role": "assistant", "content": b.text}} if self.chat
                                                    else {"text": b.text})))
        extras = _extras(final)
        if final.beams:
            extras["beam_scores"] = [round(b.score, 6) for b in final.beams]
        return dict(out, choices=choices, usage=_usage(final), medusa=extras)

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False, entries=None) -> dict:
        lp = self.logprobs(entries) if entries is not None else None
        if self.chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return dict(self._head("chat.completion.chunk"), choices=[choice])
        return dict(self._head("text_completion"), choices=[{"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}])


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# ----------------------------------------------------------------- the face


class OpenAIFace:
    """Routes one HTTP request (a Starlette Request, as Ray Serve hands to __call__) to the Ingress."""

    def __init__(self, ingress):
        self.ingress = ingress

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        routes = {("POST", "/v1/chat/completions"): self._chat, ("POST", "/v1/completions"): self._completions,
                  ("GET", "/v1/models"): self._models, ("GET", "/health"): self._health}
        fn = routes.get((request.method, path))
        if fn is None:
            if any(p == path for _, p in routes):
                return error_response(405, f"{request.method} is not allowed on {path}", "invalid_request_error")
            return error_response(404, f"no route {request.method} {path}", "not_found_error", "unknown_url")
        return await fn(request, path)

    def _error(self, e: BaseException) -> JSONResponse:
        return _json_error(error_of(e, "-", self.ingress.settings))

    async def _health(self, request: Request, route: str) -> Response:
        resp = await self.ingress.Health(pb.HealthRequest())
        ok = resp.status == pb.HealthResponse.SERVING
        body = {"status": "ok" if ok else "unavailable", "details": dict(resp.details)}
        return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)})

    async def _models(self, request: Request, route: str) -> Response:
        ctx = HttpContext(request, route)
        try:
            resp = await self.ingress.ListModels(pb.ListModelsRequest(), ctx)
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's shape
            return self._error(e)
        if ctx.status is not None:
            return _json_error(http_error(ctx.status))
        data = [{"id": m.id, "object": "model", "created": 0, "owned_by": "medusa",
                 "medusa": {"heads": m.heads, "tree": m.tree, "context_length": m.context_length, "vocab_size": m.vocab_size}}
                for m in resp.models]
        return JSONResponse({"object": "list", "data": data})

    async def _chat(self, request: Request, route: str) -> Response:
        return await self._generate(request, route, ChatCompletionRequest)

    async def _completions(self, request: Request, route: str) -> Response:
        return await self._generate(request, route, CompletionRequest)

    async def _body(self, request: Request, limit: int) -> bytes | JSONResponse:
        """The body, refused (413) past `limit` bytes before it is all read or parsed."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return error_response(413, f"the request is {declared} bytes; this server accepts at most {limit}",
                                  "invalid_request_error", "request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                return error_response(413, f"the request is over {limit} bytes; this server accepts at most {limit}",
                                      "invalid_request_error", "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _generate(self, request: Request, route: str, model_cls) -> Response:
        raw = await self._body(request, self.ingress.settings.max_request_bytes)
        if isinstance(raw, Response):
            return raw
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        if not isinstance(raw, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error")
        try:
            body = model_cls.model_validate(raw)
            req = to_generate_request(body, request.headers.get("x-session-id"))
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ())) or None
            return error_response(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                                  "invalid_request_error", "invalid_value", param)
        except BadRequest as e:
            return error_response(400, str(e), "invalid_request_error", "invalid_value", e.param)
        ctx = HttpContext(request, route)
        # Auth, size, model (404), queue (429), drain (503) and quota are checked by the ingress,
        # in that order; a failure ends its stream with an empty message and the status on ctx.
        events = self.ingress.Generate(req, ctx)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:  # noqa: BLE001 - failures before the first token keep their HTTP status
            return self._error(e)
        if ctx.status is not None:
            await events.aclose()
            return _json_error(http_error(ctx.status))
        if first is None:
            return error_response(500, "the request ended without output", "server_error")
        served = body.model or (await self.ingress.served_models() or [""])[0]
        shape = _Shape(model_cls is ChatCompletionRequest, served, uuid.uuid4().hex, req.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(shape, first, events, ctx, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text: list[str] = []
        entries: list = []
        final = None
        try:
            async for kind, msg in _events(first, events):
                if kind == "delta":
                    text.append(msg.delta.text)
                    entries.extend(msg.delta.logprobs)
                else:
                    final = msg.final
        except Exception as e:  # noqa: BLE001
            return self._error(e)
        if ctx.status is not None:
            return _json_error(http_error(ctx.status))
        if final is None:
            return error_response(500, "the request ended without a final message", "server_error")
        return JSONResponse(shape.response("".join(text), final, entries))

    async def _stream(self, shape: _Shape, first, events, ctx: HttpContext, include_usage: bool) -> AsyncIterator[bytes]:
        opened = False
        try:
            async for kind, msg in _events(first, events):
                if kind == "delta":
                    if msg.delta.text or msg.delta.logprobs or not opened:
                        yield sse(shape.chunk(msg.delta.text, first=not opened, entries=list(msg.delta.logprobs)))
                        opened = True
                    continue
                final = msg.final
                last = shape.chunk(None if shape.chat else "", FINISH.get(final.finish_reason, final.finish_reason))
                last["medusa"] = _extras(final)
                yield sse(last)
                if include_usage:
                    yield sse(dict(shape.chunk(None), choices=[], usage=_usage(final)))
            if ctx.status is not None:  # after the headers went out, the error is an event
                yield sse({"error": http_error(ctx.status)[1]})
        except Exception as e:  # noqa: BLE001
            yield sse({"error": error_of(e, "-", self.ingress.settings)[1]})
        finally:
            await events.aclose()
        yield SSE_DONE


async def _events(first, rest):
    """(kind, message) of the stream's deltas and final; a message without an event (the one
    that carries a failure's status) is skipped."""
    async for msg in _chain(first, rest):
        kind = msg.WhichOneof("event")
        if kind:
            yield kind, msg


async def _chain(first, rest):
    yield first
    async for x in rest:
        yield x


__all__ = ["OpenAIFace", "ChatCompletionRequest", "CompletionRequest", "to_generate_request", "sse", "error_of", "http_error"]
