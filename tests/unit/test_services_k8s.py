"""The KubeRay manifests (k8s/ base and overlays, built like `kustomize build`) validate against
the KubeRay v1.7.0 RayService CRD copied into tests/data/kuberay, their Serve
config is a valid Ray Serve config for our app, the base's Serve config is
deploy/serve_config.yaml, and they are what an operator needs: no KubeRay fields deprecated since
1.1, an upgrade strategy that does not double the GPUs, a model from a volume, scaled ingress and
tokenizer deployments, a termination grace period longer than Serve's drain, grpc.health.v1
probes, Prometheus scraping (annotations + the PodMonitor) and no hard-coded OTLP endpoint."""
from pathlib import Path, PurePosixPath

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
DEPRECATED = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}  # KubeRay >= 1.1 ignores them
OVERLAYS = sorted(p.name for p in (REPO / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def _pointer_parent(doc, path):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]


def apply_json6902(doc, ops):
    for op in ops:
        parent, key = _pointer_parent(doc, op["path"])
        if isinstance(parent, list):
            key = len(parent) if key == "-" else int(key)
        if op["op"] == "replace":
            assert (key < len(parent)) if isinstance(parent, list) else key in parent, f"replace of a missing {op['path']}"
            parent[key] = op["value"]
        elif op["op"] == "add":
            parent.insert(key, op["value"]) if isinstance(parent, list) else parent.__setitem__(key, op["value"])
        elif op["op"] == "remove":
            del parent[key]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def build(kdir: Path) -> list[dict]:
    """A small `kustomize build`: resources (files or directories) then JSON 6902 patches."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    docs = []
    for r in k.get("resources", []):
        p = (kdir / r).resolve()
        docs += build(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    for patch in k.get("patches", []):
        ops = yaml.safe_load((kdir / patch["path"]).read_text())
        t = patch["target"]
        targets = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert targets, f"patch target {t} not found"
        for d in targets:
            apply_json6902(d, ops)
    return docs


@pytest.fixture(scope="module")
def rayservice_schema():
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "RayService"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return v1["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("variant", ["base", *OVERLAYS], ids=lambda v: f"k8s-{v}")  # (a bare "gpu" id reads as the gpu marker)
def test_manifests_validate_against_the_crd(variant, rayservice_schema):
    docs = build(REPO / "k8s" / ("base" if variant == "base" else f"overlays/{variant}"))
    services = [d for d in docs if d["kind"] == "RayService"]
    assert len(services) == 1
    rs = services[0]
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(rayservice_schema).iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])
    rcc = rs["spec"]["rayClusterConfig"]
    assert rcc["enableInTreeAutoscaling"] is True and rcc["headGroupSpec"]["template"]["spec"]["containers"]
    for g in rcc["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    ports = {p["port"] for p in rs["spec"]["serveService"]["spec"]["ports"]}
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve_cfg["grpc_options"]["port"] in ports
    check_serve_config(serve_cfg)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service"}  # Redis
    check_operability(rs, serve_cfg, docs, gpus=variant.startswith("gpu"))
    check_gpus_per_pod(rs, serve_cfg)


def _pods(rs):
    rcc = rs["spec"]["rayClusterConfig"]
    return [rcc["headGroupSpec"]["template"]] + [g["template"] for g in rcc["workerGroupSpecs"]]


def check_operability(rs, serve_cfg, docs, gpus):
    spec = rs["spec"]
    assert not DEPRECATED & set(spec), f"deprecated KubeRay fields: {DEPRECATED & set(spec)}"
    strategy = spec.get("upgradeStrategy", {}).get("type")
    assert strategy in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    if gpus:  # a cluster change must not start a second set of GPU pods
        assert strategy != "NewCluster"
        if strategy == "NewClusterWithIncrementalUpgrade":
            assert spec["upgradeStrategy"]["clusterUpgradeOptions"]["maxSurgePercent"] < 100
    assert "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" in serve_cfg["grpc_options"]["grpc_servicer_functions"]
    app = next(a for a in serve_cfg["applications"] if a["import_path"] == "services.app:build_app")
    deps = {d["name"]: d for d in app.get("deployments", [])}
    for name in ("Ingress", "Tokenizer"):  # scaled with traffic, not one replica each
        d = deps[name]
        assert d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1)) > 1, name
    drain = max(d.get("graceful_shutdown_timeout_s", 20) for d in deps.values())
    model = app["args"].get("model")
    for pod in _pods(rs):
        ps = pod["spec"]
        assert ps.get("terminationGracePeriodSeconds", 30) > drain
        labels = pod.get("metadata", {}).get("labels", {})
        ann = pod.get("metadata", {}).get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true"
        c = ps["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(ann["prometheus.io/port"]) == ports["metrics"]
        probe = c["readinessProbe"]["grpc"]
        assert probe["port"] == serve_cfg["grpc_options"]["port"] == ports["grpc"]
        assert not [e for e in c.get("env", []) if e["name"].startswith("OTEL_EXPORTER_OTLP")]
        if model and model.startswith("/"):  # a model path must be on a volume every pod mounts
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            vols = {v["name"]: v for v in ps.get("volumes", [])}
            assert any(PurePosixPath(model).is_relative_to(path) and name in vols for name, path in mounts.items()), model
            for name in mounts:
                claim = vols[name].get("persistentVolumeClaim", {}).get("claimName")
                assert claim is None or any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
        monitor = yaml.safe_load((REPO / "k8s" / "monitoring" / "podmonitor.yaml").read_text())
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= set(ports)


def check_gpus_per_pod(rs, serve_cfg) -> None:
    """An engine replica's ranks (tensor_parallel_size bundles of engine_num_gpus, STRICT_PACK:
    one node) fit one GPU worker pod, and a pod holds whole replicas."""
    from services.config import Settings

    app = next(a for a in serve_cfg["applications"] if a["import_path"] == "services.app:build_app")
    s = Settings.parse(app["args"])
    need = s.tensor_parallel_size * s.engine_num_gpus
    for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        gpus = float(g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if need and gpus:
            assert gpus >= need and gpus % need == 0, (gpus, need)


def test_the_tensor_parallel_overlay_spans_the_gpus_of_a_pod():
    rs = next(d for d in build(REPO / "k8s" / "overlays" / "gpu-tp") if d["kind"] == "RayService")
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert app["tensor_parallel_size"] == 2 and app["engine_num_gpus"] == 1 and app["device"] == "cuda"
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == "2"


def check_serve_config(cfg: dict) -> None:
    """A valid Ray Serve config whose medusa app settings parse and whose servicer imports."""
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from services.config import Settings

    ServeDeploySchema.parse_obj(cfg)
    assert gRPCOptions(**cfg["grpc_options"]).grpc_servicer_func_callable
    app = next(a for a in cfg["applications"] if a["import_path"] == "services.app:build_app")
    s = Settings.parse(app["args"])
    assert s.autoscaling["min_replicas"] <= s.autoscaling["max_replicas"]


def test_base_serve_config_is_deploy_serve_config():
    pytest.importorskip("ray")
    deploy = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    check_serve_config(deploy)
    base = next(d for d in build(REPO / "k8s" / "base") if d["kind"] == "RayService")
    assert yaml.safe_load(base["spec"]["serveConfigV2"]) == deploy


@pytest.mark.parametrize("variant", ["base", *OVERLAYS], ids=lambda v: f"k8s-{v}")
def test_redis_and_keys_are_locked_down(variant):
    """Issue 26: Redis behind AUTH from a Secret, persistent, reachable only from the cluster's
    pods; API keys mounted into the ingress (head) pod only; termination grace >= drain grace."""
    docs = build(REPO / "k8s" / ("base" if variant == "base" else f"overlays/{variant}"))
    kinds = {d["kind"]: d for d in docs}
    redis = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "medusa-redis")
    c = redis["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in c["args"] and "$(REDIS_PASSWORD)" in c["args"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "medusa-redis-auth"
    assert c["args"][c["args"].index("--appendonly") + 1] == "yes" and c["volumeMounts"][0]["mountPath"] == "/data"
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}  # Redis's, the models'
    assert redis["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] in claims
    policy = kinds["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    rs = kinds["RayService"]
    rcc = rs["spec"]["rayClusterConfig"]
    head = rcc["headGroupSpec"]["template"]
    workers = [g["template"] for g in rcc["workerGroupSpecs"]]
    app = next(a for a in yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"] if a["import_path"] == "services.app:build_app")
    for t in [head, *workers]:
        assert allowed.items() <= t["metadata"]["labels"].items()
        assert t["spec"]["terminationGracePeriodSeconds"] >= app["args"]["drain_grace_s"] + 5
        for ct in t["spec"]["containers"]:
            assert not any(e["name"] == "MEDUSA_API_KEYS" for e in ct.get("env", []))  # raw keys in no environment
    head_env = {e["name"]: e.get("value") for e in head["spec"]["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in head["spec"]["containers"][0]["volumeMounts"]}
    assert head_env["MEDUSA_API_KEYS_FILE"].startswith(mounts["api-keys"] + "/")
    assert head_env["REDIS_PASSWORD_FILE"].startswith(mounts["redis-auth"] + "/")
    assert head_env["MEDUSA_INGRESS_RESOURCE"] in rcc["headGroupSpec"]["rayStartParams"]["resources"]
    for t in workers:
        assert not any(v.get("secret", {}).get("secretName") == "medusa-api-keys" for v in t["spec"].get("volumes", []))
