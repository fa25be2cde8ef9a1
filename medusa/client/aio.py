"""AsyncMedusaClient: the one implementation of the SDK's call logic (metadata, deadlines,
retries before the first token, error mapping). MedusaClient runs this same code on a
private event loop, so there is no second copy to keep in step.

Knows the wire contract (medusa.proto) and gRPC; nothing of torch or of the server's insides."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from medusa.client.errors import DeadlineExceededError, ServerError, from_rpc_error, retry_after_s
from medusa.client.retry import RetryPolicy, remaining
from medusa.client.types import Delta, GenerateResult, StreamFold, build_request
from medusa.proto.v1 import medusa_pb2 as pb
from medusa.proto.v1 import medusa_pb2_grpc as pb_grpc

_UNSET = object()


class AsyncMedusaClient:
    """`async with AsyncMedusaClient("host:9000", api_key=...) as c: r = await c.generate("Hi")`.

    timeout: default deadline in seconds for each call (None: no deadline); every method also
    takes timeout=. tls=True (or root_certificates=PEM bytes) opens a TLS channel."""

    def __init__(self, target: str, api_key: str | None = None, *, timeout: float | None = 60.0,
                 retry: RetryPolicy = RetryPolicy(), tls: bool = False, root_certificates: bytes | None = None,
                 metadata: Sequence[tuple[str, str]] = (), options: Sequence[tuple[str, object]] = (),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._metadata = tuple(metadata) + ((("authorization", f"Bearer {api_key}"),) if api_key else ())
        self._tls = tls or root_certificates is not None
        self._root_certificates = root_certificates
        self._options = tuple(options)
        self._sleep = sleep
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.MedusaStub | None = None
        self.attempts = 0  # calls opened so far (retries included); for tests and diagnostics

    # ----- channel -----
    def _get_stub(self) -> pb_grpc.MedusaStub:
        if self._stub is None:  # created lazily: a grpc.aio channel belongs to the running loop
            if self._tls:
                creds = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
                self._channel = grpc.aio.secure_channel(self.target, creds, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._stub = pb_grpc.MedusaStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncMedusaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ----- the one retry loop -----
    async def _attempts(self, open_call: Callable[[pb_grpc.MedusaStub, float | None], object],
                        timeout, started: Callable[[], bool] = lambda: False) -> AsyncIterator[object]:
        """Yield the responses of open_call(stub, seconds_left), reopening it after UNAVAILABLE
        (or RESOURCE_EXHAUSTED with a retry-after-ms hint, waiting at least the hint) until
        something was received, the attempts are spent or the deadline passed."""
        timeout = self.timeout if timeout is _UNSET else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = remaining(deadline, time.monotonic())
            if left == 0.0:
                raise DeadlineExceededError(f"deadline of {timeout}s passed after {attempt - 1} attempt(s)")
            self.attempts += 1
            call = open_call(self._get_stub(), left)
            try:
                if hasattr(call, "__aiter__"):
                    async for resp in call:
                        yield resp
                else:
                    yield await call
                return
            except grpc.aio.AioRpcError as e:
                hint = retry_after_s(e)
                if not self.retry.should_retry(e.code(), attempt, started(), hint):
                    raise from_rpc_error(e) from None
                delay = self.retry.delay(attempt, hint)
                left = remaining(deadline, time.monotonic())
                if left is not None and delay >= left:
                    raise DeadlineExceededError(
                        f"deadline of {timeout}s passed while retrying: {e.details()}") from None
                await self._sleep(delay)
            finally:
                if not call.done():
                    call.cancel()

    # ----- public API -----
    async def stream(self, prompt: str | None = None, *, messages=None, timeout=_UNSET,
                     on_final: Callable[[GenerateResult], None] | None = None, **params) -> AsyncIterator[Delta]:
        """Yield text deltas (with their token ids) as the server accepts tokens; on_final, if
        given, receives the GenerateResult (finish reason, usage, stats) once the stream ends."""
        fold = StreamFold()
        async for item in self._stream(prompt, messages, timeout, params, fold):
            if isinstance(item, Delta):
                yield item
        if on_final is not None:
            on_final(fold.final)

    async def generate(self, prompt: str | None = None, *, messages=None, timeout=_UNSET, **params) -> GenerateResult:
        """Generate to the end; returns .text, .token_ids, .finish_reason, .usage, .stats (and
        .logprobs with logprobs=k)."""
        fold = StreamFold()
        async for _ in self._stream(prompt, messages, timeout, params, fold):
            pass
        return fold.final

    async def _stream(self, prompt, messages, timeout, params, fold: StreamFold):
        req = build_request(prompt, messages=messages, **params)
        fold.asked = req.logprobs
        md = self._metadata
        async for resp in self._attempts(lambda stub, left: stub.Generate(req, metadata=md, timeout=left),
                                         timeout, started=lambda: fold.started):
            delta = fold.push(resp)
            if delta is not None:
                yield delta
        if fold.final is None:
            raise ServerError("the stream ended without a final message")

    async def _unary(self, method: str, req, timeout):
        md = self._metadata
        agen = self._attempts(lambda stub, left: getattr(stub, method)(req, metadata=md, timeout=left), timeout)
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    async def tokenize(self, text: str | None = None, *, messages=None, timeout=_UNSET) -> list[int]:
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of text= or messages=")
        req = pb.TokenizeRequest(text=text) if text is not None else pb.TokenizeRequest(
            chat=pb.Conversation(messages=[pb.ChatMessage(**m) for m in messages]))
        return list((await self._unary("Tokenize", req, timeout)).token_ids)

    async def list_models(self, *, timeout=_UNSET) -> list[dict]:
        resp = await self._unary("ListModels", pb.ListModelsRequest(), timeout)
        return [{"id": m.id, "heads": m.heads, "tree": m.tree, "context_length": m.context_length,
                 "vocab_size": m.vocab_size} for m in resp.models]

    async def health(self, *, timeout=_UNSET) -> tuple[str, dict[str, str]]:
        resp = await self._unary("Health", pb.HealthRequest(), timeout)
        return pb.HealthResponse.Status.Name(resp.status), dict(resp.details)


__all__ = ["AsyncMedusaClient", "GenerateResult"]
