"""Start and stop the whole application on a local Ray cluster: used by `medusa serve`, the
integration tests and the gRPC benchmark. Reads a Ray Serve config file (deploy/serve_config.yaml
format) or takes the app's settings directly; starts a private redis-server (with a random
password) when no Redis URL is given; hashes MEDUSA_API_KEYS in this process and removes it
from the environment before Ray starts, so no Ray process (GCS, raylet, proxy, replicas) holds
a raw key; drains the ingress before stopping (Cluster.drain, then stop).

Knows Ray and Serve start-up; nothing of request handling."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from medusa.errors import MedusaError
from services.app import APP_NAME, build_app, grpc_options
from services.config import Settings
from services.redis_local import LocalRedis, start_redis
from services.tenancy import hash_key, parse_env_keys


MAX_MESSAGE_BYTES = 16 << 20


@dataclass
class Cluster:
    grpc_port: int
    settings: dict
    redis: LocalRedis | None = None
    dev_keys: dict = field(default_factory=dict)  # tenant -> key, generated for this run only
    http_port: int = 0  # Serve's HTTP proxy: the OpenAI-compatible API under /v1

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's base URL (for openai.OpenAI(base_url=...))."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def drain(self, grace_s: float | None = None) -> dict:
        """Stop admitting and let in-flight streams finish (up to grace_s, default the
        drain_grace_s setting); the rest end UNAVAILABLE. Returns the ingress's counts."""
        from ray import serve

        grace = Settings.parse(self.settings).drain_grace_s if grace_s is None else grace_s
        handle = serve.get_deployment_handle("Ingress", APP_NAME)
        return handle.drain.remote(grace).result(timeout_s=grace + 30)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            if self.redis is not None:
                self.redis.stop()


def read_config(path: str | Path) -> tuple[dict, dict]:
    """(the medusa app's args, the grpc_options) of a Serve config file."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MedusaError(f"cannot read serve config {path}: {e}") from None
    apps = [a for a in (doc or {}).get("applications") or [] if a.get("import_path", "").startswith("services.app:")]
    if not apps:
        raise MedusaError(f"{path}: no application with import_path services.app:build_app")
    return dict(apps[0].get("args") or {}), dict(doc.get("grpc_options") or {})


def read_http_port(path: str | Path) -> int | None:
    """The Serve config's http_options.port, if it sets one."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MedusaError(f"cannot read serve config {path}: {e}") from None
    port = (doc.get("http_options") or {}).get("port")
    return int(port) if port else None


def with_keys(args: dict, env_keys: str | None) -> tuple[dict, dict]:
    """args with MEDUSA_API_KEYS folded in as hashes; when no key is configured at all, one
    development key per run (returned so the caller can print it)."""
    args = dict(args)
    keys = list(args.get("api_keys") or [])
    keys += [{"tenant": t, "key_sha256": h} for h, t in parse_env_keys(env_keys).items()]
    dev = {}
    if not keys and args.get("require_auth", True):
        dev = {"dev": "mk-" + secrets.token_urlsafe(18)}
        keys = [{"tenant": "dev", "key_sha256": hash_key(dev["dev"])}]
    args["api_keys"] = keys
    return args, dev


def take_env_keys(environ=os.environ) -> str | None:
    """MEDUSA_API_KEYS, removed from this process's environment (Ray's processes inherit it)."""
    return environ.pop("MEDUSA_API_KEYS", None)


def start(args: dict, *, grpc_port: int = 9000, redis_url: str | None = None, num_cpus: int | None = None,
          http_port: int | None = None, env_keys: str | None = None, metrics_port: int | None = None) -> Cluster:
    """Start (or join the already initialised) Ray, Serve with the gRPC proxy on grpc_port and
    the app. metrics_port: where this node serves Prometheus metrics (Ray's default otherwise)."""
    import ray
    from ray import serve

    from medusa.ports import free_port

    taken = take_env_keys()  # whatever the caller passes, the raw variable must not reach Ray
    # Serve's gRPC proxy accepts 2 GiB messages by default: gRPC itself refuses larger than this one
    # (RESOURCE_EXHAUSTED) before reading them; the ingress's max_request_bytes is the finer limit.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_MESSAGE_BYTES))
    args, dev = with_keys(args, taken if env_keys is None else env_keys)
    redis = None
    redis_url = redis_url or args.get("redis_url") or os.environ.get("REDIS_URL")
    if not redis_url:
        redis = start_redis(password=secrets.token_urlsafe(18))
        redis_url = redis.url
    args["redis_url"] = redis_url
    Settings.parse(args)  # a bad config fails here, before Ray starts
    cluster = Cluster(grpc_port, args, redis, dev, http_port or free_port())
    try:
        if not ray.is_initialized():
            extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
            ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=True, logging_level="WARNING", **extra)
        serve.start(grpc_options=grpc_options(grpc_port), http_options={"host": "127.0.0.1", "port": cluster.http_port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        cluster.stop()
        raise
    return cluster
