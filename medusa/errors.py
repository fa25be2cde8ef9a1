"""Errors a user can act on. The CLI turns them into a message and exit code 2; the services
turn them into gRPC INVALID_ARGUMENT. Nothing here knows about either."""


class MedusaError(Exception):
    """Base class of every error caused by the caller's input (never by a bug)."""


class ModelLoadError(MedusaError):
    """Missing, unreadable or unsupported model."""


class HeadsMismatchError(MedusaError):
    """Draft heads trained for another base model, or a malformed heads directory."""


class TreeError(MedusaError):
    """A malformed tree (named or from JSON)."""


class RequestError(MedusaError):
    """Invalid generation request: sampling values, lengths, context overflow."""
