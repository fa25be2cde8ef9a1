"""Serve's "cannot take this request now" errors (a deployment's queue is full, a deployment is
not running), recognised by class so both faces answer UNAVAILABLE / 503 ("retry later") rather
than an internal error.

Knows Ray Serve's exception classes; nothing of the wire."""
from __future__ import annotations


def overloaded(e: BaseException) -> BaseException | None:
    """The Serve error behind e (itself, or the cause a Ray task error carries), if any."""
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover - without the serve extra nothing is Serve's
        return None
    for x in (e, getattr(e, "cause", None)):
        if isinstance(x, (BackPressureError, DeploymentUnavailableError)):
            return x
    return None
