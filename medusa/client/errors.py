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


class AuthenticationError(MedusaClientError):
    """Missing or unknown API key (UNAUTHENTICATED / PERMISSION_DENIED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class QuotaExceededError(MedusaClientError):
    """The tenant's concurrency or tokens-per-minute limit is reached (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InvalidRequestError(MedusaClientError):
    """The server rejected the request as malformed (INVALID_ARGUMENT); details say why."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(MedusaClientError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(MedusaClientError):
    """The server could not be reached, or no replica could take the request (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class ServerError(MedusaClientError):
    """Any other failure (INTERNAL, UNKNOWN, CANCELLED, ...)."""

    code = grpc.StatusCode.INTERNAL


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
