"""Typed exceptions of the client SDK, one per gRPC status a caller handles differently.

Knows gRPC status codes, nothing of transports or retries."""
from __future__ import annotations

import grpc


RETRY_AFTER_MD = "retry-after-ms"  # trailing metadata the server sends when a retry may succeed later


class MedusaClientError(Exception):
    """Base class: every failed call raises a subclass of this. retry_after_s: the server's
    hint (trailing metadata retry-after-ms) of when trying again may succeed, else None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None, retry_after_s: float | None = None):
        super().__init__(details or (code or self.code).name.lower())
        self.details = details
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code


# one subclass per status a caller handles differently: (name, status, what it means)
_KINDS = (
    ("AuthenticationError", grpc.StatusCode.UNAUTHENTICATED, "Missing or unknown API key (UNAUTHENTICATED / PERMISSION_DENIED)."),
    ("QuotaExceededError", grpc.StatusCode.RESOURCE_EXHAUSTED,
     "The tenant's concurrency or tokens-per-minute limit is reached (RESOURCE_EXHAUSTED)."),
    ("InvalidRequestError", grpc.StatusCode.INVALID_ARGUMENT,
     "The server rejected the request as malformed (INVALID_ARGUMENT); details say why."),
    ("DeadlineExceededError", grpc.StatusCode.DEADLINE_EXCEEDED, "The call's deadline passed (DEADLINE_EXCEEDED)."),
    ("UnavailableError", grpc.StatusCode.UNAVAILABLE,
     "The server could not be reached, or no replica could take the request (UNAVAILABLE)."),
    ("ServerError", grpc.StatusCode.INTERNAL, "Any other failure (INTERNAL, UNKNOWN, CANCELLED, ...)."),
)
_classes = {name: type(name, (MedusaClientError,), {"code": code, "__doc__": doc, "__module__": __name__})
            for name, code, doc in _KINDS}
AuthenticationError = _classes["AuthenticationError"]
QuotaExceededError = _classes["QuotaExceededError"]
InvalidRequestError = _classes["InvalidRequestError"]
DeadlineExceededError = _classes["DeadlineExceededError"]
UnavailableError = _classes["UnavailableError"]
ServerError = _classes["ServerError"]


_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceededError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def error_for(code: grpc.StatusCode, details: str | None, retry_after_s: float | None = None) -> MedusaClientError:
    return _BY_CODE.get(code, ServerError)(details or "", code, retry_after_s)


def retry_after_s(e: grpc.RpcError) -> float | None:
    """The server's retry-after-ms trailer in seconds (None when absent or malformed)."""
    try:
        md = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never reached a server has none
        return None
    for k, v in md:
        if k == RETRY_AFTER_MD:
            try:
                ms = float(v)
            except (TypeError, ValueError):
                return None
            return ms / 1000.0 if ms >= 0 else None
    return None


def from_rpc_error(e: grpc.RpcError) -> MedusaClientError:
    return error_for(e.code(), e.details(), retry_after_s(e))
