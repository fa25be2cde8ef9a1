"""Who is calling and may they: API keys -> tenants (keys kept only as SHA-256 digests), the
`authorization: Bearer <key>` metadata, and per-tenant limits on concurrent requests and on
tokens per minute (a token bucket in Redis, refilled continuously).

Keys come from the serve config (hashes), a keys file read by the ingress only (the path in the
setting `api_keys_file` or MEDUSA_API_KEYS_FILE; a mounted k8s Secret) and the Redis hash
`medusa:apikeys` (behind Redis AUTH); a Redis hit is cached in memory for `key_cache_s` so a
Redis blip does not log tenants out. The raw MEDUSA_API_KEYS variable is never read here: the
launcher hashes it and removes it from the environment before Ray starts.

Concurrency slots are leases (a Redis sorted set of lease ids scored by their expiry), renewed
while a stream runs: a crashed ingress or a Redis restart can drop slots (limits open for at most
one lease) but never leave a negative count behind.

Knows Redis keys and Lua; nothing of gRPC (callers map AuthError / QuotaError to status codes)."""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from services.config import ConfigError, Settings, TenantLimits
from services.redis_guard import RedisGuard

KEYS_HASH = "medusa:apikeys"  # Redis hash: sha256(key) -> tenant
KEYS_FILE_ENV = "MEDUSA_API_KEYS_FILE"


class AuthError(Exception):
    """No key, or a key that maps to no tenant."""


class Retryable(Exception):
    """A refusal that may succeed later; retry_after_s: when trying again may succeed."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message, retry_after_s)  # all in args: Ray pickles it to the caller
        self.message, self.retry_after_s = message, retry_after_s

    def __str__(self) -> str:
        return self.message


class QuotaError(Retryable):
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
            raise ValueError(f'MEDUSA_API_KEYS entries are "tenant:key" (entry {len(out) + 1} is not)')
        out[hash_key(key)] = tenant
    return out


def parse_keys_file(text: str, where: str = "keys file") -> dict[str, str]:
    """Lines "tenant:key" or "tenant:sha256:<64 hex>" (# comments, blank lines and a
    MEDUSA_API_KEYS="..." / comma-separated line are accepted too) -> {sha256(key): tenant}.
    Errors name the line, never its content (it may hold a key)."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("MEDUSA_API_KEYS="):
            line = line.split("=", 1)[1].strip().strip('"').strip("'")
        for item in line.split(","):
            tenant, sep, rest = item.strip().partition(":")
            if not sep or not tenant or not rest:
                raise ConfigError(f'{where} line {n}: entries are "tenant:key" or "tenant:sha256:<hex>"')
            if rest.startswith("sha256:") and len(rest) == 71:
                out[rest[7:].lower()] = tenant
            else:
                out[hash_key(rest)] = tenant
    return out


def keys_file_path(s: Settings) -> str | None:
    return s.api_keys_file or os.environ.get(KEYS_FILE_ENV) or None


class KeyStore:
    """sha256(key) -> tenant, from the serve config, the keys file and the Redis hash
    `medusa:apikeys` (looked up when a key is not known locally; hits cached for cache_s)."""

    def __init__(self, hashed: dict[str, str], redis: RedisGuard | None = None, *, cache_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.hashed = dict(hashed)
        self.redis = redis
        self.cache_s = cache_s
        self.clock = clock
        self._cache: dict[str, tuple[str, float]] = {}  # digest -> (tenant, expiry)

    @classmethod
    def from_settings(cls, s: Settings, redis: RedisGuard | None = None) -> "KeyStore":
        hashed = {}
        for k in s.api_keys:
            hashed[k.get("key_sha256") or hash_key(k["key"])] = str(k["tenant"])
        path = keys_file_path(s)
        if path:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"cannot read the API keys file {path}: {e.strerror or e}") from None
            hashed.update(parse_keys_file(text, f"API keys file {path}"))
        return cls(hashed, redis, cache_s=s.key_cache_s)

    async def tenant(self, key: str | None) -> str:
        if not key:
            raise AuthError("missing API key: send metadata 'authorization: Bearer <key>'")
        digest = hash_key(key)
        t = self.hashed.get(digest)
        if t is None:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] > self.clock():
                return hit[0]
            if self.redis is not None:
                t = await self.redis.call("auth", lambda r: r.hget(KEYS_HASH, digest), None)
                if t is None and hit is not None and not self.redis.healthy():
                    return hit[0]  # Redis is down: a key seen recently stays valid until it is back
                if t:
                    self._cache[digest] = (t, self.clock() + self.cache_s)
                    if len(self._cache) > 10_000:
                        self._cache.pop(next(iter(self._cache)))
                else:
                    self._cache.pop(digest, None)
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

# Concurrency as leases: a sorted set of lease ids scored by expiry (Redis server time). Expired
# leases are dropped before counting, so a lost release costs at most one lease period.
_ACQUIRE = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tostring(tonumber(first[2]) - now)}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return {1, '0'}
"""

_RENEW = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


def conc_key(tenant: str) -> str:
    return f"medusa:conc:{tenant}"


@dataclass
class Lease:
    tenant: str
    reserved_tokens: int
    holds_slot: bool
    id: str = ""
    renewed: float = 0.0  # monotonic time of the last renewal


class Quota:
    """Admission by tenant. acquire() reserves prompt + max_new tokens and a concurrency lease;
    renew() extends the lease while the request runs; release() refunds the tokens not
    generated and frees the slot (idempotent). Without Redis (or while it is down) limits are
    not enforced, with a warning and a metric from the RedisGuard."""

    def __init__(self, settings: Settings, redis: RedisGuard | None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.redis = redis
        self.clock = clock

    def _limits(self, tenant: str) -> TenantLimits:
        return self.settings.limits_for(tenant)

    def _static(self, tenant: str, cost_tokens: int) -> TenantLimits:
        lim = self._limits(tenant)
        if lim.max_concurrent == 0:
            raise QuotaError(f"tenant {tenant!r} may not run requests (max_concurrent 0)")
        if lim.tokens_per_minute is not None and cost_tokens > lim.tokens_per_minute:
            raise QuotaError(f"tenant {tenant!r}: request needs {cost_tokens} tokens but the limit is "
                             f"{lim.tokens_per_minute} tokens per minute")
        return lim

    def _tpm_error(self, tenant: str, lim: TenantLimits, left: float, cost: int) -> QuotaError:
        wait = max(0.0, (cost - left) * 60.0 / lim.tokens_per_minute)
        return QuotaError(f"tenant {tenant!r} is over its {lim.tokens_per_minute} tokens per minute "
                          f"({left:.0f} left, this request needs {cost})", retry_after_s=wait)

    async def precheck(self, tenant: str, min_cost_tokens: int) -> None:
        """Before tokenisation: the request's least cost (max_new_tokens + 1) must fit the
        tenant's limits and what its bucket holds now (nothing is reserved)."""
        lim = self._static(tenant, min_cost_tokens)
        if self.redis is None or lim.tokens_per_minute is None:
            return
        res = await self.redis.call("quota", lambda r: r.eval(_BUCKET, 1, f"medusa:tpm:{tenant}", lim.tokens_per_minute, 0), None)
        if res is not None and float(res[1]) < min_cost_tokens:
            raise self._tpm_error(tenant, lim, float(res[1]), min_cost_tokens)

    async def charge(self, tenant: str, tokens: int) -> None:
        """Take tokens from the bucket without a slot (Tokenize)."""
        lim = self._static(tenant, tokens)
        if self.redis is None or lim.tokens_per_minute is None or tokens <= 0:
            return
        res = await self.redis.call("quota", lambda r: r.eval(_BUCKET, 1, f"medusa:tpm:{tenant}", lim.tokens_per_minute, tokens), None)
        if res is not None and not int(res[0]):
            raise self._tpm_error(tenant, lim, float(res[1]), tokens)

    async def acquire(self, tenant: str, cost_tokens: int) -> Lease:
        lim = self._static(tenant, cost_tokens)
        lease = Lease(tenant, 0, False, uuid.uuid4().hex, self.clock())
        if self.redis is None:
            return lease
        if lim.max_concurrent is not None:
            res = await self.redis.call("quota", lambda r: r.eval(_ACQUIRE, 1, conc_key(tenant), lim.max_concurrent,
                                                                  self.settings.quota_lease_s, lease.id), None)
            if res is not None and not int(res[0]):
                raise QuotaError(f"tenant {tenant!r} has {lim.max_concurrent} requests in flight (its limit)",
                                 retry_after_s=self.settings.retry_after_ms / 1000)
            lease.holds_slot = res is not None
        if lim.tokens_per_minute is not None:
            res = await self.redis.call("quota", lambda r: r.eval(_BUCKET, 1, f"medusa:tpm:{tenant}", lim.tokens_per_minute, cost_tokens), None)
            if res is not None and not int(res[0]):
                await self.release(lease, 0)
                raise self._tpm_error(tenant, lim, float(res[1]), cost_tokens)
            lease.reserved_tokens = cost_tokens if res is not None else 0
        return lease

    async def renew(self, lease: Lease, force: bool = False) -> None:
        """Extend the lease (at most every third of its period unless forced)."""
        now = self.clock()
        if self.redis is None or not lease.holds_slot or (not force and now - lease.renewed < self.settings.quota_lease_s / 3):
            return
        lease.renewed = now
        await self.redis.call("quota", lambda r: r.eval(_RENEW, 1, conc_key(lease.tenant), self.settings.quota_lease_s, lease.id), None)

    async def release(self, lease: Lease, used_tokens: int) -> None:
        if self.redis is None:
            return
        lim = self._limits(lease.tenant)
        if lease.holds_slot:
            lease.holds_slot = False
            await self.redis.call("quota", lambda r: r.zrem(conc_key(lease.tenant), lease.id), None)
        refund = lease.reserved_tokens - used_tokens
        if refund > 0 and lim.tokens_per_minute is not None:
            await self.redis.call("quota", lambda r: r.eval(_BUCKET, 1, f"medusa:tpm:{lease.tenant}", lim.tokens_per_minute, -refund), None)
        lease.reserved_tokens = 0
