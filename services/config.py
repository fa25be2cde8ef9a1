"""Settings of the serving application, from the serve config's `args` (a plain dict), with
the defaults `medusa serve` uses on a laptop. Knows nothing of Ray or of how settings are used."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from medusa.errors import MedusaError


class ConfigError(MedusaError):
    """A malformed serve configuration."""


@dataclass(frozen=True)
class TenantLimits:
    max_concurrent: int | None = None     # requests in flight at once; None = unlimited
    tokens_per_minute: int | None = None  # prompt + completion tokens; None = unlimited
    max_queued: int | None = None         # requests waiting for their first token, per ingress replica
    max_sessions: int | None = None       # kept sessions per engine replica (None: the serve setting)

    @classmethod
    def parse(cls, d: dict | None) -> "TenantLimits":
        d = d or {}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown tenant limit(s): {', '.join(sorted(unknown))}")
        for k, v in d.items():
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ConfigError(f"tenant limit {k} must be a non-negative integer, got {v!r}")
        return cls(**d)


@dataclass(frozen=True)
class Settings:
    model: str | None = None              # HF checkpoint dir (bf16/fp16/FP8) or GGUF; None: the embedded default model
    heads: str = "default"                # default | medusa | hydra | none | PATH (ours, or the reference Medusa layout)
    tree: str | None = None
    dtype: str | None = None              # float32 | bfloat16 | float16; None: float32 on CPU, bfloat16 on GPU
    quantization: str | None = None       # None: as the checkpoint declares; "fp8": FP8 GEMMs (quantised on load if needed)
    device: str = "cpu"
    max_batch: int | None = None          # None: 8, or derived from gpu_memory_utilization
    gpu_memory_utilization: float | None = None  # fraction of the GPU the engine may hold; sizes the KV pool
    max_seq_len: int | None = None        # per request, prompt + completion (None: the engine's default)
    torch_threads: int | None = None      # per engine replica; None: torch's default
    engine_replicas: int = 1
    engine_num_cpus: float = 1.0
    engine_num_gpus: float = 0.0
    tensor_parallel_size: int = 1         # ranks per engine replica (a placement group of as many bundles, one node)
    autoscaling: dict | None = None       # Serve autoscaling_config for the engine (overrides engine_replicas)
    redis_url: str | None = None          # None: no Redis (no affinity, local quotas off)
    session_ttl_s: int = 1800
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_stop_sequences: int = 8
    api_keys: tuple = ()                  # ({"tenant": t, "key_sha256": h} | {"tenant": t, "key": k}, ...)
    require_auth: bool = True
    local_detokenize: bool = True         # stream text with the Tokenizer deployment's decoder in the ingress
    default_limits: TenantLimits = TenantLimits()
    tenant_limits: dict = field(default_factory=dict)  # tenant -> TenantLimits
    tracing: str | None = None            # otlp | console | none | memory; None: from OTEL_* env
    model_id: str = ""                    # name reported by ListModels (default: the model's)
    # ---- limits and faults (RELIABILITY.md) ----
    api_keys_file: str | None = None      # "tenant:key" / "tenant:sha256:<hex>" lines, read by the ingress only
    key_cache_s: float = 300.0            # how long a key found in Redis stays valid in memory (Redis blips)
    quota_lease_s: float = 30.0           # a concurrency slot expires unless renewed (crashes cannot leak it)
    max_request_bytes: int = 1 << 20      # serialized request size, checked before anything else
    max_prompt_chars: int = 200_000       # prompt / chat characters, checked before tokenisation
    max_queued_per_tenant: int = 32       # requests of one tenant waiting for a first token, per ingress replica
    max_queued_per_replica: int = 16      # requests Serve queues per engine replica beyond max_ongoing
    admit_timeout_s: float = 15.0         # no engine replica accepted within this: UNAVAILABLE, fail fast
    retry_after_ms: int = 1000            # hint sent with RESOURCE_EXHAUSTED / UNAVAILABLE (trailer retry-after-ms)
    sessions_per_tenant: int = 4          # kept sessions per tenant and engine replica (its share of the pool)
    drain_grace_s: float = 20.0           # SIGTERM / Ctrl-C: in-flight streams get this long to finish

    @classmethod
    def parse(cls, d: dict | None) -> "Settings":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown serve setting(s): {', '.join(sorted(unknown))}")
        if "default_limits" in d:
            d["default_limits"] = TenantLimits.parse(d["default_limits"])
        if "tenant_limits" in d:
            d["tenant_limits"] = {str(t): TenantLimits.parse(v) for t, v in (d["tenant_limits"] or {}).items()}
        if "api_keys" in d:
            keys = d["api_keys"] or []
            for k in keys:
                if not isinstance(k, dict) or "tenant" not in k or not ({"key", "key_sha256"} & set(k)):
                    raise ConfigError('api_keys entries need "tenant" and "key_sha256" (or "key" for development)')
            d["api_keys"] = tuple(dict(k) for k in keys)
        s = cls(**d)
        if s.max_batch is not None and (not isinstance(s.max_batch, int) or s.max_batch < 1):
            raise ConfigError(f"max_batch must be a positive integer, got {s.max_batch!r}")
        if s.quantization not in (None, "fp8"):
            raise ConfigError(f"quantization must be fp8 or absent (the checkpoint's own format), got {s.quantization!r}")
        if s.gpu_memory_utilization is not None:
            u = s.gpu_memory_utilization
            if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
                raise ConfigError(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r}")
            if not str(s.device).startswith("cuda"):
                raise ConfigError("gpu_memory_utilization sizes GPU memory: set device: cuda (or remove it)")
        for name in ("engine_replicas", "session_ttl_s", "default_max_new_tokens", "max_new_tokens_limit",
                     "max_request_bytes", "max_prompt_chars", "max_queued_per_replica", "max_queued_per_tenant", "retry_after_ms",
                     "sessions_per_tenant", "tensor_parallel_size"):
            if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(s, name)!r}")
        for name in ("key_cache_s", "quota_lease_s", "admit_timeout_s", "drain_grace_s"):
            v = getattr(s, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative number of seconds, got {v!r}")
        if s.tensor_parallel_size > 1 and str(s.device).startswith("cuda"):
            if s.device != "cuda" or s.engine_num_gpus != 1:
                raise ConfigError("tensor_parallel_size on GPUs puts each rank on its own GPU: set device: cuda and "
                                  "engine_num_gpus: 1 (per rank)")
        if s.default_max_new_tokens > s.max_new_tokens_limit:
            raise ConfigError("default_max_new_tokens exceeds max_new_tokens_limit")
        return s

    @property
    def batch_limit(self) -> int:
        """Requests one replica decodes together at most: max_batch, else what a memory-sized
        replica may choose (medusa.model.memory.MAX_BATCH_CAP), else 8."""
        if self.max_batch is not None:
            return self.max_batch
        from medusa.model.memory import MAX_BATCH_CAP

        return MAX_BATCH_CAP if self.gpu_memory_utilization is not None else 8

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant, self.default_limits)
