"""Session affinity: which engine replica a request should go to, and where that choice is
remembered. `route` is the policy, a pure function of (the session's recorded replica, the
replicas' loads); SessionStore keeps (tenant, session) -> replica in Redis with a TTL.

Knows nothing of Ray (services.router adapts Ray's RequestRouter to `route`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from services.redis_guard import RedisGuard


@dataclass(frozen=True)
class RouteDecision:
    ranks: tuple[tuple[str, ...], ...]  # replica ids, most preferred rank first
    reason: str  # affinity | new | reassigned | none (no session)


def route(entry: str | None, loads: Mapping[str, int | None], *, has_session: bool = True) -> RouteDecision:
    """Prefer the session's replica when it still exists; otherwise the least-loaded replicas
    (ties share the first rank), then the rest by load. An unknown load (None) counts as 0,
    so a replica nobody has probed yet gets tried."""
    if not loads:
        return RouteDecision((), "none")
    by_load = sorted(loads, key=lambda r: (loads[r] or 0, r))
    if entry is not None and entry in loads:
        rest = tuple(r for r in by_load if r != entry)
        return RouteDecision(((entry,), rest) if rest else ((entry,),), "affinity")
    low = loads[by_load[0]] or 0
    first = tuple(r for r in by_load if (loads[r] or 0) == low)
    rest = tuple(r for r in by_load if r not in first)
    reason = "reassigned" if entry is not None else ("new" if has_session else "none")
    return RouteDecision((first, rest) if rest else (first,), reason)


def session_key(tenant: str, session: str) -> str:
    return f"medusa:session:{tenant}:{session}"


def engine_session_id(tenant: str, session: str) -> str:
    """The id the engine keeps KV under: namespaced so tenants never share a cache entry."""
    return f"{tenant}/{session}"


class SessionStore:
    """(tenant, session) -> engine replica id in Redis, refreshed with a TTL on every turn.
    Redis trouble returns None (no affinity) through the RedisGuard."""

    def __init__(self, redis: RedisGuard | None, ttl_s: int):
        self.redis = redis
        self.ttl_s = ttl_s

    async def get(self, tenant: str, session: str) -> str | None:
        if self.redis is None:
            return None
        return await self.redis.call("sessions", lambda r: r.get(session_key(tenant, session)), None)

    async def put(self, tenant: str, session: str, replica: str) -> None:
        if self.redis is not None:
            await self.redis.call("sessions", lambda r: r.set(session_key(tenant, session), replica, ex=self.ttl_s), None)
