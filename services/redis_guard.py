"""Calls to Redis that never take the request path down: each call has a short timeout; on
failure the component logs a warning (once per outage), counts it in a metric, skips Redis
for a few seconds and the caller gets its fallback value.

Knows redis.asyncio; nothing of what the keys mean."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger("medusa.services.redis")
T = TypeVar("T")


def connect(url: str, timeout_s: float = 0.5):
    """A client for url; the password may be in the URL or, to keep it out of configs and the
    Ray cluster's environment, in the file named by REDIS_PASSWORD_FILE (a mounted Secret)."""
    import os

    import redis.asyncio as aioredis

    extra = {}
    pw_file = os.environ.get("REDIS_PASSWORD_FILE")
    if pw_file and os.path.isfile(pw_file):
        with open(pw_file) as f:
            extra["password"] = f.read().strip()
    elif os.environ.get("REDIS_PASSWORD"):
        extra["password"] = os.environ["REDIS_PASSWORD"]
    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True, **extra)


class RedisGuard:
    def __init__(self, url: str | None, metrics=None, *, cooldown_s: float = 5.0, timeout_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.metrics = metrics
        self.cooldown_s = cooldown_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._client = None
        self._loop = None
        self._down_until = 0.0
        self._warned = False

    @property
    def configured(self) -> bool:
        return self.url is not None

    def healthy(self) -> bool:
        """False while a recent call failed (within the cooldown)."""
        return self.url is not None and self.clock() >= self._down_until

    def client(self):
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client belongs to one event loop
            self._client, self._loop = connect(self.url, self.timeout_s), loop
        return self._client

    async def call(self, component: str, fn: Callable[[object], Awaitable[T]], fallback: T) -> T:
        """fn(client) or, if Redis is not configured, down or failing, `fallback`."""
        if self.url is None or self.clock() < self._down_until:
            return fallback
        try:
            out = await asyncio.wait_for(fn(self.client()), self.timeout_s * 2)
        except (OSError, asyncio.TimeoutError, ConnectionError, _redis_errors()) as e:
            self._down_until = self.clock() + self.cooldown_s
            if not self._warned:
                log.warning("redis at %s unreachable (%s: %s): %s continues without it", _safe(self.url),
                            type(e).__name__, e, component)
                self._warned = True
            if self.metrics is not None:
                self.metrics.redis_unavailable(component)
            return fallback
        self._warned = False
        return out


def _redis_errors():
    import redis

    return redis.RedisError


def _safe(url: str | None) -> str:
    """The URL without its password (never logged)."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
