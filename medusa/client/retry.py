"""When to retry a call and how long to wait: exponential backoff with full jitter, only
for UNAVAILABLE and only before the first token arrived, never past the call's deadline.

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

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.5 * cap, cap)

    def should_retry(self, code: grpc.StatusCode, attempt: int, started: bool) -> bool:
        return not started and code in self.retry_codes and attempt < self.max_attempts


def remaining(deadline: float | None, now: float) -> float | None:
    """Seconds left until an absolute deadline (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - now)
