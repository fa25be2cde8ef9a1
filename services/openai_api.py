"""The OpenAI-compatible HTTP face of the ingress: POST /v1/chat/completions and
/v1/completions (JSON, or server-sent events with `stream: true`, ending in `data: [DONE]`),
GET /v1/models and GET /health, served from Ray Serve's HTTP proxy by the same Ingress that
serves gRPC.

Each HTTP request becomes a medusa.v1 GenerateRequest (services.openai_schema validates the
bodies and shapes the responses) run through Ingress.Generate, so authentication
(`Authorization: Bearer <key>`, the gRPC tenants' keys), size limits, quota leases, the
bounded admission queue, drain, unknown models, session affinity, stop strings, tracing and
metrics are the gRPC path's, written once (services.ingress, services.limits).
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

Knows HTTP, JSON and OpenAI's error shape; nothing of tenants, engines or tokenizers."""
from __future__ import annotations

import json
import math
import uuid
from typing import Any, AsyncIterator

import grpc
from opentelemetry import trace
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from medusa.proto.v1 import medusa_pb2 as pb
from services import limits
from services.openai_schema import (FINISH, BadRequest, ChatCompletionRequest, CompletionRequest, Shape, extras,
                                    to_generate_request, usage)


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
        shape = Shape(model_cls is ChatCompletionRequest, served, uuid.uuid4().hex, req.logprobs)
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

    async def _stream(self, shape: Shape, first, events, ctx: HttpContext, include_usage: bool) -> AsyncIterator[bytes]:
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
                last["medusa"] = extras(final)
                yield sse(last)
                if include_usage:
                    yield sse(dict(shape.chunk(None), choices=[], usage=usage(final)))
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
