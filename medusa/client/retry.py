"""When to retry a call and how long to wait: exponential backoff with jitter for UNAVAILABLE,
and RESOURCE_EXHAUSTED when the server sent a retry hint (trailing metadata retry-after-ms,
never waited on longer than max_hint_s); only before the first token arrived, never past the
call's deadline. A hint also lengthens the backoff of an UNAVAILABLE retry.

Pure: the clock and the random source are arguments."""
from __future__ import annotations

import random
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4          # calls in all (1 = no retry)
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retry_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    hinted_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.RESOURCE_EXHAUSTED,)  # retried only with a hint
    max_hint_s: float = 30.0       # a longer hint is not waited for: the error is raised

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.5 * cap, cap)

    def should_retry(self, code: grpc.StatusCode, attempt: int, started: bool, hint_s: float | None = None) -> bool:
        if started or attempt >= self.max_attempts:
            return False
        if hint_s is not None and hint_s > self.max_hint_s:
            return False
        return code in self.retry_codes or (code in self.hinted_codes and hint_s is not None)

    def delay(self, attempt: int, hint_s: float | None = None, rng: random.Random | None = None) -> float:
        """The wait before the next attempt: the backoff, at least the server's hint."""
        b = self.backoff(attempt, rng)
        return b if hint_s is None else max(b, hint_s)


def remaining(deadline: float | None, now: float) -> float | None:
    """Seconds left until an absolute deadline (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - now)
