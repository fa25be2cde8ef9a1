"""The Ray Serve application: Tokenizer, Engine (with the session-affinity request router) and
the Ingress (gRPC medusa.v1 + grpc.health.v1, and the OpenAI-compatible HTTP API), bound by
`build_app(args)` (the serve config's import_path target), plus the gRPC options the proxy
needs. Deployment classes are thin: the logic is in the plain classes.

Knows Ray Serve's API; nothing of decoding or of the wire format beyond the servicer name."""
from __future__ import annotations

import os

from ray import serve
from ray.serve.config import RequestRouterConfig

from services.config import Settings
from services.engine_replica import EngineReplica, engine_sizes
from services.health import SERVICER as HEALTH_SERVICER
from services.health import HealthMixin
from services.ingress import Ingress
from services.metrics import Metrics
from services.openai_api import OpenAIFace
from services.tokenizer_service import TokenizerService

APP_NAME = "medusa"
SERVICER = "services.grpc_wire.add_MedusaServicer_to_server"  # tolerant deserializers: malformed -> INVALID_ARGUMENT
ROUTER = "services.router:SessionAffinityRouter"


@serve.deployment(name="Tokenizer", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class TokenizerDeployment(TokenizerService):
    def __init__(self, settings: dict):
        from medusa.model.loading import resolve
        from medusa.tokenizer import Tokenizer

        s = Settings.parse(settings)
        super().__init__(Tokenizer.load(resolve(s.model)), tracing=s.tracing)


class EngineDeployment(EngineReplica):
    """One batched Engine per replica (its scheduler thread decodes; the replica's event loop
    only moves events)."""

    def __init__(self, settings: dict):
        import torch

        from medusa.decoding.engine import Engine
        from medusa.runtime import load_stack

        s = Settings.parse(settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self._ranks = self._driver = None
        if s.tensor_parallel_size > 1:  # rank 0 of N: the workers load their shards alongside (tensor_parallel.py)
            from medusa.parallel.replica import drive
            from services.tensor_parallel import Ranks

            self._ranks = Ranks(settings, s, serve.get_replica_context().replica_id.unique_id)
            stack = load_stack(s.model, heads=s.heads, tree=s.tree, dtype=s.dtype, progress=False,
                               quantization=s.quantization, group=self._ranks.group)
            self._driver = drive(self._ranks.group, stack.model, stack.heads)  # engines over it run on every rank
        else:
            stack = load_stack(s.model, heads=s.heads, tree=s.tree, dtype=s.dtype, device=s.device, progress=False,
                               quantization=s.quantization)
        sizes, kv_plan = engine_sizes(s, stack.model, stack.heads, stack.tree)
        engine = Engine(stack.model, stack.heads, stack.tree, **sizes)
        engine.warmup()  # on a GPU: capture every batch bucket's step graphs before taking traffic
        engine.start()
        cfg = stack.model.cfg
        info = {"id": s.model_id or stack.source.name, "heads": stack.heads_name, "tree": stack.tree.name,
                "context_length": engine.max_seq_len, "vocab_size": cfg.vocab_size}
        eos = tuple(sorted(set(cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
        rid = serve.get_replica_context().replica_id.unique_id
        if kv_plan is not None:
            info["kv_plan"] = kv_plan
        super().__init__(engine, replica_id=rid, eos=eos, info=info, tracing=s.tracing, metrics=Metrics(),
                         kv_plan=kv_plan, session_share=s.sessions_per_tenant)

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose scheduler thread died, or (tensor
        parallel) one of whose workers is gone or no longer takes plans, is replaced."""
        if self.engine.health()["scheduler"] is False:
            raise RuntimeError("the engine's scheduler thread is not running")
        if self._ranks is not None:
            why = self._ranks.ended()
            if why is not None:
                raise RuntimeError(why)
            self._driver.ping()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
        driver = getattr(self, "_driver", None)
        if driver is not None:
            try:
                driver.stop()
            except Exception:  # noqa: BLE001  (a broken group: its workers die with this actor anyway)
                pass


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class IngressDeployment(HealthMixin, Ingress):
    """gRPC: medusa.v1.Medusa and grpc.health.v1.Health (methods called by name by Serve's gRPC
    proxy); HTTP: the OpenAI-compatible API through Serve's HTTP proxy (__call__). Its keys come
    from the serve config and the keys file mounted into this pod only (api_keys_file /
    MEDUSA_API_KEYS_FILE)."""

    def __init__(self, tokenizer, engine, settings: dict):
        super().__init__(tokenizer, engine, Settings.parse(settings), metrics=Metrics())
        self._http = OpenAIFace(self)

    async def __call__(self, request):
        return await self._http(request)


def replicas_of(s: Settings) -> int:
    return int((s.autoscaling or {}).get("max_replicas", s.engine_replicas))


def engine_deployment(s: Settings):
    opts = dict(
        name="Engine",
        ray_actor_options={"num_cpus": s.engine_num_cpus, "num_gpus": s.engine_num_gpus},
        max_ongoing_requests=2 * s.batch_limit,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                  request_router_kwargs={"tracing": s.tracing}),
        health_check_period_s=10,
        health_check_timeout_s=60,
        # Bounded admission: beyond max_ongoing_requests per replica, each caller queues at most this
        # many (Serve answers BackPressureError -> RESOURCE_EXHAUSTED with a retry hint).
        max_queued_requests=s.max_queued_per_replica * max(1, replicas_of(s)),
        graceful_shutdown_timeout_s=s.drain_grace_s,  # a stopping replica finishes its streams first
        graceful_shutdown_wait_loop_s=1,
    )
    if s.tensor_parallel_size > 1:  # the replica (rank 0) takes the first bundle, its workers the others
        bundle = {"CPU": s.engine_num_cpus, **({"GPU": s.engine_num_gpus} if s.engine_num_gpus else {})}
        opts["placement_group_bundles"] = [bundle] * s.tensor_parallel_size
        opts["placement_group_strategy"] = "STRICT_PACK"
    if s.autoscaling:
        opts["autoscaling_config"] = dict(s.autoscaling)
    else:
        opts["num_replicas"] = s.engine_replicas
    return serve.deployment(EngineDeployment).options(**opts)


def build_app(args: dict | None = None):
    """The application for `serve run` / a serve config (`import_path: services.app:build_app`)."""
    args = dict(args or {})
    if "redis_url" not in args and os.environ.get("REDIS_URL"):
        args["redis_url"] = os.environ["REDIS_URL"]
    s = Settings.parse(args)  # fail early, in the caller, on a bad config
    tok = TokenizerDeployment.bind(args)
    eng = engine_deployment(s).bind(args)
    ingress_opts = dict(graceful_shutdown_timeout_s=s.drain_grace_s + 1, graceful_shutdown_wait_loop_s=1)
    pin = os.environ.get("MEDUSA_INGRESS_RESOURCE")  # k8s: the custom resource of the pod the keys are mounted in
    if pin:
        ingress_opts["ray_actor_options"] = {"num_cpus": 0, "resources": {pin: 0.01}}
    ingress = IngressDeployment.options(**ingress_opts)
    return ingress.bind(tok, eng, args)


def grpc_options(port: int):
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER, HEALTH_SERVICER])
