"""The serving cluster for real: Ray Serve on 2 CPUs with two engine replicas, a private
redis-server, Serve's gRPC proxy, and the client SDK. One application is shared by all tests
of this module (start-up dominates the time)."""
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("ray")
redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

from medusa.client import (AuthenticationError, InvalidRequestError, MedusaClient, QuotaExceededError,  # noqa: E402
                           RetryPolicy)
from services import launch, telemetry  # noqa: E402
from services.redis_local import free_port, start_redis  # noqa: E402
from services.routing import session_key  # noqa: E402

MAX_NEW = 12
KEYS = {"acme": "k-acme", "zeta": "k-zeta", "tiny": "k-tiny"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    spans = tmp_path_factory.mktemp("spans") / "spans.jsonl"
    r = start_redis()
    args = {
        "engine_replicas": 2, "engine_num_cpus": 0.5, "torch_threads": 1, "max_batch": 4, "max_seq_len": 512,
        "device": "cpu", "tracing": f"file:{spans}", "default_max_new_tokens": MAX_NEW, "max_new_tokens_limit": 64,
        "api_keys": [{"tenant": t, "key": k} for t, k in KEYS.items()],
        "tenant_limits": {"tiny": {"tokens_per_minute": 60, "max_concurrent": 1}},
    }
    metrics_port = free_port()
    c = launch.start(args, grpc_port=free_port(), redis_url=r.url, num_cpus=2, env_keys="", metrics_port=metrics_port)
    try:
        yield {"target": c.target, "redis": redis.Redis.from_url(r.url), "spans": spans, "metrics_port": metrics_port}
    finally:
        c.stop()
        r.stop()


def client(cluster, tenant="acme", **kw):
    kw.setdefault("retry", RetryPolicy(max_attempts=3, initial_backoff_s=0.2))
    return MedusaClient(cluster["target"], api_key=KEYS.get(tenant, tenant), timeout=120, **kw)


@pytest.fixture(scope="module")
def reference(stack):
    """The batched Engine driven directly, in this process, on the same model and heads
    (conftest's `stack`: the default model, float32 on CPU, like the replicas)."""
    from medusa.decoding.engine import Engine, Request

    engine = Engine(stack.model, stack.heads, stack.tree, max_batch=2, max_seq_len=512)
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))

    def greedy(messages):
        ids = stack.tokenizer.encode_chat(messages)
        tokens, _ = engine.submit(Request(ids, max_new_tokens=MAX_NEW, stop_token_ids=eos)).result()
        return tokens, stack.tokenizer.decode(tokens)

    return greedy


def test_stream_through_the_cluster_equals_the_engine(cluster, reference):
    prompts = ["Name three colours.", "What is 2 + 2?"]
    with client(cluster) as c:
        status, details = c.health()
        assert status == "SERVING", details
        for p in prompts:
            msgs = [{"role": "user", "content": p}]
            deltas = list(c.stream(messages=msgs, max_new_tokens=MAX_NEW))
            ids = [t for d in deltas for t in d.token_ids]
            want_ids, want_text = reference(msgs)
            assert ids == want_ids
            assert "".join(d.text for d in deltas).strip() == want_text.strip()


def test_tenants_and_sessions_keep_their_replica_and_kv(cluster):
    convs = [("acme", "s1"), ("acme", "s2"), ("zeta", "s1"), ("zeta", "s3")]
    q1 = {"role": "user", "content": "Tell me a fact about the sea."}

    def turn(tenant, session, messages):
        with client(cluster, tenant) as c:
            return c.generate(messages=messages, session_id=session, max_new_tokens=8)

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(lambda ts: turn(*ts, [q1]), convs))
    assert all(r.usage.completion_tokens > 0 and r.usage.reused_prompt_tokens == 0 for r in first)
    for (tenant, session), r in zip(convs, first):
        key = session_key(tenant, session)
        assert cluster["redis"].get(key).decode() == r.replica_id
        assert 0 < cluster["redis"].ttl(key) <= 1800

    def second(ts_r):
        (tenant, session), r = ts_r
        msgs = [q1, {"role": "assistant", "content": r.text}, {"role": "user", "content": "And another one?"}]
        return turn(tenant, session, msgs)

    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(second, zip(convs, first)))
    for r1, r2 in zip(first, again):
        assert r2.replica_id == r1.replica_id  # the conversation stayed where its KV is
        assert r2.usage.reused_prompt_tokens > 0


def test_status_codes_and_the_server_stays_healthy(cluster):
    with client(cluster, tenant=None) as c:
        with pytest.raises(AuthenticationError, match="missing API key"):
            c.generate(prompt="hi")
    with client(cluster, tenant="not-a-key") as c:
        with pytest.raises(AuthenticationError, match="unknown API key"):
            c.generate(prompt="hi")
    with client(cluster) as c:
        for kwargs, reason in [(dict(prompt=""), "prompt is empty"), (dict(prompt="a", temperature=-1.0), "temperature"),
                               (dict(prompt="a", max_new_tokens=65), "limit of 64"),
                               (dict(prompt="a", session_id="x/../y"), "session_id"),
                               (dict(prompt="a", top_p=1.5, temperature=1.0), "top-p"),
                               (dict(messages=[{"role": "robot", "content": "x"}]), "role")]:
            with pytest.raises(InvalidRequestError, match=reason) as ei:
                c.generate(**kwargs)
            assert "Traceback" not in ei.value.details and "File " not in ei.value.details
    # c2 does not retry: the SDK would wait out the server's retry-after-ms hint and then succeed
    with client(cluster, "tiny") as c, client(cluster, "tiny", retry=RetryPolicy(max_attempts=1)) as c2:
        with pytest.raises(QuotaExceededError, match="limit is 60 tokens per minute"):
            c.generate(prompt="Count to three.", max_new_tokens=60)  # prompt + 60 > 60
        stream = c.stream(prompt="Count from 1 to 100: 1, 2, 3,", max_new_tokens=30)  # leaves tokens for c2's request
        next(stream)  # one request of tiny's single slot is now in flight
        with pytest.raises(QuotaExceededError, match="in flight"):
            c2.generate(prompt="hi", max_new_tokens=4)
        assert len(list(stream)) > 0
    with client(cluster) as c:
        assert c.health()[0] == "SERVING"
        assert c.generate(prompt="Hello", max_new_tokens=4).usage.completion_tokens > 0


def test_one_trace_holds_spans_from_every_deployment(cluster):
    with client(cluster) as c:
        r = c.generate(messages=[{"role": "user", "content": "Say hi."}], max_new_tokens=4)
    deadline = time.monotonic() + 10
    while True:
        spans = telemetry.read_spans(str(cluster["spans"]))
        root = [s for s in spans if s["name"] == "ingress.Generate" and s["attributes"].get("medusa.request_id") == r.request_id]
        mine = [s for s in spans if root and s["trace_id"] == root[0]["trace_id"]]
        names = {s["name"] for s in mine}
        if {"ingress.Generate", "router", "router.choose_replicas", "tokenizer.encode", "engine.prefill", "engine.decode"} <= names:
            break
        assert time.monotonic() < deadline, f"spans of the trace: {sorted(names)}"
        time.sleep(0.5)
    assert len({s["pid"] for s in mine}) >= 3  # ingress, tokenizer and engine processes
    decode = next(s for s in mine if s["name"] == "engine.decode")
    assert decode["attributes"]["medusa.tenant"] == "acme" and decode["attributes"]["medusa.completion_tokens"] > 0


def test_prometheus_metrics_are_exported(cluster):
    import urllib.request

    with client(cluster, "zeta") as c:
        c.generate(prompt="Hello", max_new_tokens=4)
    want = {"ray_medusa_generated_tokens_total", "ray_medusa_time_to_first_token_seconds_bucket",
            "ray_medusa_accepted_length_bucket", "ray_medusa_inter_token_latency_seconds_bucket",
            "ray_medusa_engine_queue_depth", "ray_medusa_requests_total"}
    deadline = time.monotonic() + 60  # metrics are pushed to the node's exporter every few seconds
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics", timeout=5).read().decode()
        except OSError:
            body = ""
        names = {line.split("{")[0] for line in body.splitlines() if line.startswith("ray_medusa_")}
        tenants = {part.split('"')[1] for line in body.splitlines() if line.startswith("ray_medusa_generated_tokens_total")
                   for part in line.split(",") if part.startswith("tenant=")}
        # Earlier tests' tenants may already be exported while this one's push is still on its way:
        # wait for both the names and this tenant's label.
        if want <= names and "zeta" in tenants:
            break
        assert time.monotonic() < deadline, f"missing metrics: {sorted(want - names)}; tenants seen: {sorted(tenants)}"
        time.sleep(2)


def test_a_vanished_replicas_session_is_reassigned_and_reprefilled(cluster):
    """Runs last: kills the engine replica holding a session; its next turn lands on a live
    replica (full prefill there) and Redis records the new one."""
    import ray

    q1 = {"role": "user", "content": "Name a planet."}
    with client(cluster, "acme") as c:
        first = c.generate(messages=[q1], session_id="moving", max_new_tokens=6)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "Engine" in a["name"] and first.replica_id in a["name"]]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        msgs = [q1, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Another?"}]
        deadline = time.monotonic() + 60
        while True:  # the router may still try the dead replica once; the SDK retries UNAVAILABLE
            try:
                second = c.generate(messages=msgs, session_id="moving", max_new_tokens=6)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    assert second.replica_id != first.replica_id
    assert second.usage.reused_prompt_tokens == 0  # re-prefilled on its new replica
    assert cluster["redis"].get(session_key("acme", "moving")).decode() == second.replica_id
