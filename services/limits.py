"""What a request may cost before any work is done for it, and what the ingress answers when
it cannot be served now: size checks before tokenisation (bytes, prompt characters, the
served model's name), the per-tenant admission queue of one ingress replica, the drain
switch, and the mapping of every failure to a gRPC status code, a one-line reason and a retry
hint (trailing metadata `retry-after-ms`, RELIABILITY.md).

Shared by every face of the ingress (gRPC, HTTP). Knows status codes and settings; nothing of
Ray beyond the names of its exceptions (matched by name, so this runs without Ray)."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

import grpc

from medusa.errors import MedusaError, RequestError
from services.config import Settings
from services.tenancy import AuthError, QuotaError, Retryable

log = logging.getLogger("medusa.services.ingress")

RETRY_AFTER_MD = "retry-after-ms"  # trailing metadata: milliseconds before a retry may succeed


class Unavailable(Retryable):
    """No engine replica can take the request now (dead, draining, none admitted it in time):
    safe to retry, elsewhere or later."""


class ModelNotFound(MedusaError):
    """The request names a model this server does not serve."""


class BadRequest(RequestError):
    """A request that failed the checks made before any work."""


# Ray's exceptions by class name: a dead or unreachable replica (safe to retry) and a full
# caller-side queue (Serve's max_queued_requests).
_UNAVAILABLE_NAMES = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
                      "ActorUnschedulableError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                      "OwnerDiedError", "ReferenceCountingAssertionError", "ActorPlacementGroupRemoved"}
_BACKPRESSURE_NAMES = {"BackPressureError"}


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def cause(e: BaseException) -> BaseException:
    """The user's exception behind a Ray task error (whose str() holds a traceback)."""
    return getattr(e, "cause", None) or e


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    details: str
    retry_after_ms: int | None = None

    def trailing_metadata(self) -> list[tuple[str, str]]:
        return [(RETRY_AFTER_MD, str(self.retry_after_ms))] if self.retry_after_ms is not None else []


class StatusRecorder:
    """The status-setting part of a gRPC servicer context, recorded: what a face that is not
    Serve's gRPC proxy (the HTTP face, services.local's grpc.aio servicer) answers with after
    the ingress set it. `status` is None while nothing failed."""

    def __init__(self):
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: list[tuple[str, str]] = []

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details

    def set_trailing_metadata(self, md) -> None:
        self.trailing = list(md)

    @property
    def status(self) -> Status | None:
        if self.code is None or self.code == grpc.StatusCode.OK:
            return None
        hint = next((int(v) for k, v in self.trailing if k == RETRY_AFTER_MD), None)
        return Status(self.code, self.details, hint)


def _ms(seconds: float | None, default_ms: int) -> int:
    return default_ms if seconds is None else max(1, int(seconds * 1000))


def status_for(e: BaseException, request_id: str, settings: Settings) -> Status:
    """The status a failure leaves as. Expected failures are one line and no log record above
    INFO (an unauthenticated caller must not be able to flood the logs); only unexpected ones
    log an ERROR with their traceback."""
    root = cause(e)
    hint = settings.retry_after_ms
    for x in (root, e):
        if isinstance(x, AuthError):
            return Status(grpc.StatusCode.UNAUTHENTICATED, _line(x))
        if isinstance(x, QuotaError):
            return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, _line(x), _ms(x.retry_after_s, hint))
        if isinstance(x, Unavailable):
            return Status(grpc.StatusCode.UNAVAILABLE, _line(x), _ms(x.retry_after_s, hint))
        if isinstance(x, ModelNotFound):
            return Status(grpc.StatusCode.NOT_FOUND, _line(x))
        if isinstance(x, MedusaError):
            return Status(grpc.StatusCode.INVALID_ARGUMENT, _line(x))
        if _names(x) & _BACKPRESSURE_NAMES:
            return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "the engine replicas' queues are full; retry later", hint)
        if _names(x) & _UNAVAILABLE_NAMES:
            log.warning("request %s: engine replica unavailable (%s)", request_id, type(x).__name__)
            return Status(grpc.StatusCode.UNAVAILABLE, "the engine replica serving this request is unavailable; "
                          "retry (no token was lost if none was received)", hint)
    log.error("request %s failed: %s", request_id, e, exc_info=e)
    return Status(grpc.StatusCode.INTERNAL, f"internal error (request {request_id})")


def _line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0][:500] if s else type(e).__name__


# ---------------------------------------------------------------- checks before any work


def check_size(request, settings: Settings) -> None:
    """Bytes of the whole message and characters of its prompt / chat: before tokenisation."""
    n = request.ByteSize()
    if n > settings.max_request_bytes:
        raise BadRequest(f"the request is {n} bytes; this server accepts at most {settings.max_request_bytes}")
    kind = request.WhichOneof("input")
    if kind == "chat":
        chars = sum(len(m.content) + len(m.role) for m in request.chat.messages)
    elif kind in ("prompt", "text"):
        chars = len(getattr(request, kind))
    else:
        chars = 0
    if chars > settings.max_prompt_chars:
        raise BadRequest(f"the prompt is {chars} characters; this server accepts at most {settings.max_prompt_chars}")


def check_model(requested: str, served: list[str]) -> None:
    """An empty name means the default model; any other must be one of the served ones."""
    if requested and served and requested not in served:
        raise ModelNotFound(f"model {requested[:100]!r} is not served here; models: {', '.join(served)}")


def room_for(max_new_tokens: int, prompt_tokens: int, context_length: int | None) -> int:
    """max_new_tokens cut to what the context leaves after the prompt (the request then ends
    with finish_reason "length"); a prompt that leaves no room is an error."""
    if not context_length:
        return max_new_tokens
    room = context_length - prompt_tokens
    if room < 1:
        raise BadRequest(f"the prompt is {prompt_tokens} tokens; the context holds {context_length} "
                         "(prompt + at least one new token)")
    return min(max_new_tokens, room)


# ---------------------------------------------------------------- admission and drain


class Admission:
    """Requests of one ingress replica between arrival and their first token, per tenant
    (bounded: a tenant cannot queue without limit behind the engines), and the drain switch:
    once draining, nothing new is admitted and in-flight streams get a grace period."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.waiting: Counter[str] = Counter()
        self.in_flight: dict[str, asyncio.Event] = {}  # request id -> set to cut its stream
        self._queued: dict[str, str] = {}  # request id -> tenant, until its first token
        self.draining = False
        self._idle: asyncio.Event | None = None

    def _limit(self, tenant: str) -> int:
        lim = self.settings.limits_for(tenant).max_queued
        return self.settings.max_queued_per_tenant if lim is None else lim

    def enter(self, tenant: str, request_id: str) -> asyncio.Event:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another instance", 0.5)
        if self.waiting[tenant] >= self._limit(tenant):
            raise QuotaError(f"tenant {tenant!r} has {self.waiting[tenant]} requests waiting for an engine "
                             "(its queue limit)", self.settings.retry_after_ms / 1000)
        self.waiting[tenant] += 1
        self._queued[request_id] = tenant
        cut = self.in_flight[request_id] = asyncio.Event()
        return cut

    def started(self, request_id: str) -> None:
        """The request's first token arrived: it leaves its tenant's queue."""
        tenant = self._queued.pop(request_id, None)
        if tenant is not None:
            self.waiting[tenant] -= 1
            if self.waiting[tenant] <= 0:
                del self.waiting[tenant]

    def leave(self, request_id: str) -> None:
        self.started(request_id)
        self.in_flight.pop(request_id, None)
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    async def drain(self, grace_s: float) -> dict:
        """Stop admitting; wait up to grace_s for in-flight requests, then cut the rest (their
        streams end UNAVAILABLE, which the SDK retries if no token was sent)."""
        self.draining = True
        before = len(self.in_flight)
        if self.in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except asyncio.TimeoutError:
                pass
        cut = list(self.in_flight.values())
        for ev in cut:
            ev.set()
        return {"in_flight": before, "finished": before - len(cut), "cancelled": len(cut)}
