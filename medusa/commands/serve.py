"""`medusa serve`: the serving cluster on this machine (gRPC medusa.v1 + grpc.health.v1, and the
OpenAI-compatible HTTP API). Starts a local Ray cluster, a
private redis-server (unless --redis-url / REDIS_URL), and the application (tokenizer, engine
replicas with session affinity, gRPC ingress) on CPU with the default model and shipped heads,
or as declared by --config (a Ray Serve config file such as deploy/serve_config.yaml).
Prints the gRPC address and serves until Ctrl-C.

The services live in the top-level `services` package (Ray, Redis, OpenTelemetry); this
module only turns flags into its settings."""
from __future__ import annotations

import os
import signal
import sys
import time

from medusa.commands.common import HelpFormatter, add_model_args
from medusa.errors import MedusaError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the cluster (Ray Serve: gRPC and the OpenAI-compatible HTTP API) on this machine",
                       formatter_class=HelpFormatter)
    p.add_argument("--config", help="Ray Serve config file (e.g. deploy/serve_config.yaml); flags below override it")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: the config's, else 9000)")
    p.add_argument("--http-port", type=int, default=None,
                   help="HTTP port of the OpenAI-compatible API, /v1/... (default: the config's, else 8000)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="Redis for sessions, quotas and keys (default: REDIS_URL, else a private redis-server)")
    add_model_args(p, device_default="the config's, else cpu")
    p.add_argument("--replicas", type=int, default=None, help="engine replicas (default 1)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together per replica (default 8, or sized by --gpu-memory-utilization)")
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="fp8: FP8 GEMMs (a bf16 checkpoint is quantised as it loads); default: the checkpoint's own format")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="fraction of the GPU's memory a replica may hold: the KV pool (and max_batch unless given) "
                        "is sized from it after the weights load (device cuda)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray cluster may use (default: all)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics of this node on this port")
    p.add_argument("--tracing", default=None, help="otlp | console | none | file:PATH (default: from OTEL_* variables)")
    p.add_argument("--drain-grace", type=float, default=None,
                   help="seconds in-flight streams get to finish on Ctrl-C / SIGTERM (default: the config's, else 20)")
    p.set_defaults(func=run)


def settings_from_args(args) -> tuple[dict, int]:
    """(the app's settings, the gRPC port) from --config and the flags."""
    app_args, grpc = {}, {}
    if args.config:
        from services.launch import read_config

        app_args, grpc = read_config(args.config)
    flags = {"model": args.model, "tree": args.tree, "dtype": None if args.dtype == "auto" else args.dtype,
             "device": args.device, "engine_replicas": args.replicas, "max_batch": args.max_batch, "tracing": args.tracing,
             "quantization": args.quantization, "gpu_memory_utilization": args.gpu_memory_utilization,
             "drain_grace_s": getattr(args, "drain_grace", None)}
    if args.heads != "default" or "heads" not in app_args:
        flags["heads"] = args.heads
    app_args.update({k: v for k, v in flags.items() if v is not None})
    app_args.setdefault("device", "cpu")
    from services.config import Settings

    Settings.parse(app_args)  # a bad value is one line here (exit 2), not a replica that fails to start
    if args.replicas is not None:
        app_args.pop("autoscaling", None)
    port = args.grpc_port or int(grpc.get("port", 9000))
    if not 0 < port < 65536:
        raise MedusaError(f"--grpc-port must be a TCP port, got {port}")
    return app_args, port


def _interrupt(*_):
    raise KeyboardInterrupt


def run(args) -> int:
    try:
        from services import launch
    except ImportError as e:
        raise MedusaError(f"medusa serve needs the serve extras (pip install 'medusa-serve[serve]'): {e}") from None
    app_args, port = settings_from_args(args)
    print(f"medusa serve: starting Ray and the application (model: {app_args.get('model') or 'default'}, "
          f"heads: {app_args.get('heads', 'default')}, device: {app_args['device']}"
          + (f", {app_args['quantization']}" if app_args.get("quantization") else "")
          + (f", KV sized to {app_args['gpu_memory_utilization']:.0%} of the GPU"
             if app_args.get("gpu_memory_utilization") else "") + ") ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    http_port = args.http_port or (launch.read_http_port(args.config) if args.config else None) or 8000
    if not 0 < http_port < 65536:
        raise MedusaError(f"--http-port must be a TCP port, got {http_port}")
    cluster = launch.start(app_args, grpc_port=port, redis_url=args.redis_url, num_cpus=args.num_cpus,
                           metrics_port=args.metrics_port, http_port=http_port)
    try:
        redis = cluster.settings["redis_url"] + (" (private redis-server)" if cluster.redis else "")
        print(f"medusa serve: gRPC medusa.v1.Medusa at {cluster.target}  (ready in {time.perf_counter() - t0:.0f}s; "
              f"redis {redis})", flush=True)
        print(f"medusa serve: OpenAI-compatible API at {cluster.base_url}  (grpc.health.v1 on the gRPC port)", flush=True)
        if args.metrics_port:
            print(f"medusa serve: Prometheus metrics at http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
        for tenant, key in cluster.dev_keys.items():
            print(f"medusa serve: development API key for tenant {tenant!r}: {key}  "
                  f"(set MEDUSA_API_KEYS=\"tenant:key,...\" to choose keys)", flush=True)
        print("medusa serve: Ctrl-C to stop", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _drain(cluster)
    finally:
        cluster.stop()
    return 0


def _drain(cluster) -> None:
    """Stop admitting, let in-flight streams finish within the grace period, then stop; a
    second Ctrl-C / SIGTERM stops at once."""
    print("medusa serve: draining (a second Ctrl-C stops at once) ...", file=sys.stderr, flush=True)
    try:
        out = cluster.drain()
        print(f"medusa serve: drained: {out.get('finished', 0)} stream(s) finished, "
              f"{out.get('cancelled', 0)} cut at the grace period; stopping", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("medusa serve: stopping now", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - stopping anyway
        print(f"medusa serve: drain failed ({type(e).__name__}); stopping", file=sys.stderr)
