"""Who is calling and may they: API keys -> tenants (keys kept only as SHA-256 digests), the
`authorization: Bearer <key>` metadata, and per-tenant limits on concurrent requests and on
tokens per minute (a token bucket in Redis, refilled continuously).

Knows Redis keys and Lua; nothing of gRPC (callers map AuthError / QuotaError to status codes)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable

from services.config import Settings, TenantLimits
from services.redis_guard import RedisGuard

KEYS_HASH = "medusa:apikeys"  # Redis hash: sha256(key) -> tenant


class AuthError(Exception):
    """No key, or a key that maps to no tenant."""


class QuotaError(Exception):
    """The tenant is over one of its limits."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(metadata: Iterable[tuple[str, str]]) -> str | None:
    for k, v in metadata or ():
        if k.lower() == "authorization" and isinstance(v, str):
            scheme, _, token = v.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def parse_env_keys(spec: str | None) -> dict[str, str]:
    """MEDUSA_API_KEYS="tenant:key,tenant2:key2" -> {sha256(key): tenant}."""
    out = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        tenant, sep, key = item.strip().partition(":")
        if not sep or not tenant or not key:
            raise ValueError(f'MEDUSA_API_KEYS entries are "tenant:key", got {item.strip()!r}')
        out[hash_key(key)] = tenant
    return out


class KeyStore:
    """sha256(key) -> tenant, from the serve config, MEDUSA_API_KEYS and the Redis hash
    `medusa:apikeys` (looked up when a key is not known locally)."""

    def __init__(self, hashed: dict[str, str], redis: RedisGuard | None = None):
        self.hashed = dict(hashed)
        self.redis = redis

    @classmethod
    def from_settings(cls, s: Settings, redis: RedisGuard | None = None, env: str | None = None) -> "KeyStore":
        hashed = {}
        for k in s.api_keys:
            hashed[k.get("key_sha256") or hash_key(k["key"])] = str(k["tenant"])
        hashed.update(parse_env_keys(os.environ.get("MEDUSA_API_KEYS") if env is None else env))
        return cls(hashed, redis)

    async def tenant(self, key: str | None) -> str:
        if not key:
            raise AuthError("missing API key: send metadata 'authorization: Bearer <key>'")
        digest = hash_key(key)
        t = self.hashed.get(digest)
        if t is None and self.redis is not None:
            t = await self.redis.call("auth", lambda r: r.hget(KEYS_HASH, digest), None)
        if not t:
            raise AuthError("unknown API key")
        return t


# Token bucket: capacity = tokens_per_minute, refilled at capacity/60 per second. Atomic in Redis;
# `cost` <= 0 refunds. Returns {allowed, tokens left}.
_BUCKET = """
local cap = tonumber(ARGV[1]); local rate = cap / 60.0; local cost = tonumber(ARGV[2])
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap; local ts = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local ok = 0
if cost <= 0 or tokens >= cost then tokens = math.min(cap, tokens - cost); ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return {ok, tostring(tokens)}
"""

_CONCURRENCY = """
local n = redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 3600)
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]); return 0 end
return 1
"""


@dataclass
class Lease:
    tenant: str
    reserved_tokens: int
    holds_slot: bool


class Quota:
    """Admission by tenant. acquire() reserves prompt + max_new tokens and a concurrency slot;
    release() refunds the tokens not generated and frees the slot. Without Redis (or while it
    is down) limits are not enforced, with a warning and a metric from the RedisGuard."""

    def __init__(self, settings: Settings, redis: RedisGuard | None):
        self.settings = settings
        self.redis = redis

    def _limits(self, tenant: str) -> TenantLimits:
        return self.settings.limits_for(tenant)

    async def acquire(self, tenant: str, cost_tokens: int) -> Lease:
        lim = self._limits(tenant)
        if lim.max_concurrent == 0 or (lim.tokens_per_minute is not None and cost_tokens > lim.tokens_per_minute):
            raise QuotaError(f"tenant {tenant!r}: request needs {cost_tokens} tokens but the limit is "
                             f"{lim.tokens_per_minute} tokens per minute" if lim.max_concurrent != 0
                             else f"tenant {tenant!r} may not run requests (max_concurrent 0)")
        lease = Lease(tenant, 0, False)
        if self.redis is None:
            return lease
        if lim.max_concurrent is not None:
            ok = await self.redis.call("quota", lambda r: r.eval(_CONCURRENCY, 1, f"medusa:conc:{tenant}", lim.max_concurrent), None)
            if ok is not None and not int(ok):
                raise QuotaError(f"tenant {tenant!r} has {lim.max_concurrent} requests in flight (its limit)")
            lease.holds_slot = ok is not None
        if lim.tokens_per_minute is not None:
            res = await self.redis.call("quota", lambda r: r.eval(_BUCKET, 1, f"medusa:tpm:{tenant}", lim.tokens_per_minute, cost_tokens), None)
            if res is not None and not int(res[0]):
                await self.release(lease, 0)
                raise QuotaError(f"tenant {tenant!r} is over its {lim.tokens_per_minute} tokens per minute "
                                 f"({float(res[1]):.0f} left, this request needs {cost_tokens})")
            lease.reserved_tokens = cost_tokens if res is not None else 0
        return lease

    async def release(self, lease: Lease, used_tokens: int) -> None:
        if self.redis is None:
            return
        lim = self._limits(lease.tenant)
        if lease.holds_slot:
            lease.holds_slot = False
            await self.redis.call("quota", lambda r: r.decr(f"medusa:conc:{lease.tenant}"), None)
        refund = lease.reserved_tokens - used_tokens
        if refund > 0 and lim.tokens_per_minute is not None:
            await self.redis.call("quota", lambda r: r.eval(_BUCKET, 1, f"medusa:tpm:{lease.tenant}", lim.tokens_per_minute, -refund), None)
        lease.reserved_tokens = 0
