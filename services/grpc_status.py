"""How a failure leaves the ingress: the status services.limits.status_for chose (code,
one-line reason, trailing metadata) is set on the gRPC context, so the method can return
without Serve logging a traceback; without a context (a direct call) it is raised as
ServiceAbort, which carries the same status in its args (Ray pickles it).

Knows gRPC status codes; nothing of what failed."""
from __future__ import annotations

import grpc

from services import limits


class ServiceAbort(Exception):
    """Raised (when there is no gRPC context to set) with the status code and reason."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        super().__init__(code, details, trailing)  # all in args: Ray pickles the exception to the proxy
        self.code, self.details, self.trailing = code, details, tuple(trailing)

    def __str__(self) -> str:
        return self.details


def fail(grpc_context, st: limits.Status):
    """Set the status on the context (the caller then returns), or raise it without one."""
    if grpc_context is None:
        raise ServiceAbort(st.code, st.details, tuple(st.trailing_metadata()))
    grpc_context.set_code(st.code)
    grpc_context.set_details(st.details)
    md = st.trailing_metadata()
    if md and hasattr(grpc_context, "set_trailing_metadata"):
        grpc_context.set_trailing_metadata(md)

