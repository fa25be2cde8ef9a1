"""The reliability suite (issue 26): the serving cluster for real (Ray Serve with two engine
replicas on 2 CPUs, a password-protected redis-server with an append-only file on a free port,
Serve's gRPC proxy, the client SDK), driven by bounded load, fuzzed requests, cancellations and
faults. Traffic goes to 127.0.0.1 only. The profile (conftest.py) bounds counts and seconds:
`short` in CI, `long` under `make reliability`.

Order matters and is the file's order: load, fuzz, cancels, tenant isolation, Redis restart,
keys search, a replica killed mid-stream, and the drain last (it stops admitting)."""
import os
import random
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(900)]  # a hung fault ends the run
pytest.importorskip("ray")
redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

from medusa.client import MedusaClient, MedusaClientError, RetryPolicy  # noqa: E402
from medusa.proto.v1 import medusa_pb2 as pb  # noqa: E402
from services import launch  # noqa: E402
from services.redis_local import free_port, start_redis  # noqa: E402
from services.tenancy import hash_key  # noqa: E402

MAX_NEW = 8
# Raw keys: given to the launcher through MEDUSA_API_KEYS (acme, zeta) and a keys file (tiny), and
# one added at run time to Redis (redisy). None may appear in a log, a trace or an environment.
KEYS = {"acme": "rk-acme-" + "a1" * 8, "zeta": "rk-zeta-" + "b2" * 8, "tiny": "rk-tiny-" + "c3" * 8,
        "redisy": "rk-redisy-" + "d4" * 8}
PROMPTS = ["Name three colours.", "What is 2 + 2?", "Say hello.", "Name a planet.", "Count to three."]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, report):
    tmp = tmp_path_factory.mktemp("reliability")
    spans = tmp / "spans.jsonl"
    keys_file = tmp / "api-keys"
    keys_file.write_text(f"tiny:{KEYS['tiny']}\n")
    r = start_redis(password="pw-" + os.urandom(8).hex(), dir=str(tmp))
    saved = {k: os.environ.get(k) for k in ("MEDUSA_API_KEYS", "MEDUSA_API_KEYS_FILE")}
    os.environ["MEDUSA_API_KEYS"] = f"acme:{KEYS['acme']},zeta:{KEYS['zeta']}"
    os.environ["MEDUSA_API_KEYS_FILE"] = str(keys_file)  # a path: inherited by the Ray processes
    args = {
        "engine_replicas": 2, "engine_num_cpus": 0.5, "torch_threads": 1, "max_batch": 4, "max_seq_len": 512,
        "device": "cpu", "tracing": f"file:{spans}", "default_max_new_tokens": MAX_NEW, "max_new_tokens_limit": 64,
        "tenant_limits": {"tiny": {"max_concurrent": 2}}, "sessions_per_tenant": 1, "quota_lease_s": 10,
        "drain_grace_s": 5, "admit_timeout_s": 20, "require_auth": True,
    }
    t0 = time.monotonic()
    c = launch.start(args, grpc_port=free_port(), redis_url=r.url, num_cpus=2)
    state = {"target": c.target, "redis": r, "spans": spans, "cluster": c, "tmp": tmp}
    try:
        with client(state) as cl:
            deadline = time.monotonic() + 120
            while cl.health()[0] != "SERVING":
                assert time.monotonic() < deadline, "the cluster did not become healthy"
                time.sleep(1)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        yield state
    finally:
        c.stop()
        state["redis"].stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(cluster, tenant="acme", **kw):
    kw.setdefault("retry", RetryPolicy(max_attempts=4, initial_backoff_s=0.2, max_hint_s=5))
    kw.setdefault("timeout", 120)
    return MedusaClient(cluster["target"], api_key=KEYS.get(tenant, tenant), **kw)


def redis_client(cluster):
    return redis.Redis.from_url(cluster["redis"].url)


@pytest.fixture(scope="module")
def reference(stack):
    """Greedy outputs of the batched Engine driven directly in this process (same model, heads,
    float32 on CPU), computed once per prompt."""
    from medusa.decoding.engine import Engine, Request

    engine = Engine(stack.model, stack.heads, stack.tree, max_batch=2, max_seq_len=512)
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
    cache = {}

    def greedy(prompt):
        if prompt not in cache:
            ids = stack.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            cache[prompt] = engine.submit(Request(ids, max_new_tokens=MAX_NEW, stop_token_ids=eos)).result()[0]
        return cache[prompt]

    for p in PROMPTS:
        greedy(p)
    return greedy


def engine_stats():
    """stats() of every live engine replica, each call steered to one replica by the router."""
    import ray
    from ray import serve

    h = serve.get_deployment_handle("Engine", launch.APP_NAME)
    ids = [a["name"].rsplit("#", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith("SERVE_REPLICA::medusa#Engine#")]
    out = {}
    for rid in ids:
        st = h.stats.remote({"affinity": rid}).result(timeout_s=30)
        out[st["replica"]] = st
    assert set(out) == set(ids), (sorted(out), ids)
    return out


def code_of(e: BaseException) -> str:
    return e.code.name if isinstance(e, MedusaClientError) else type(e).__name__


# ---------------------------------------------------------------- load


def test_load_every_greedy_output_equals_the_engine(cluster, reference, profile, report):
    stop_at = time.monotonic() + profile["seconds"]
    codes, ttfts = Counter(), []
    mismatches = []

    def worker(i):
        rng = random.Random(i)
        with client(cluster, "acme" if i % 2 else "zeta") as c:
            while time.monotonic() < stop_at:
                p = rng.choice(PROMPTS)
                t0 = time.monotonic()
                try:
                    ids, first = [], None
                    for d in c.stream(messages=[{"role": "user", "content": p}], max_new_tokens=MAX_NEW):
                        first = first or time.monotonic() - t0
                        ids.extend(d.token_ids)
                    codes["OK"] += 1
                    ttfts.append(first or 0.0)
                    if ids != reference(p):
                        mismatches.append(p)
                except MedusaClientError as e:
                    codes[code_of(e)] += 1

    with ThreadPoolExecutor(profile["clients"]) as pool:
        list(pool.map(worker, range(profile["clients"])))
    ttfts.sort()
    report["load"] = {"clients": profile["clients"], "seconds": profile["seconds"], "requests": sum(codes.values()),
                      "by_status": dict(codes), "mismatches": len(mismatches),
                      "ttft_p50_s": round(ttfts[len(ttfts) // 2], 2) if ttfts else None}
    assert codes["OK"] > 0 and not mismatches
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # back-pressure is the only acceptable refusal


# ---------------------------------------------------------------- fuzz


MUTATIONS = {  # field -> values, most of them invalid
    "prompt": ["", "x" * 300_000, "\u00e9\u4e2d\U0001f600", "\x00\x01"],
    "chat": [[], [("robot", "x")], [("user", "")], [("", "hi")], [("system", "be brief"), ("user", "hi")]],
    "max_new_tokens": [1, 65, 10**6, 2**32 - 1],
    "session_id": ["../x", "a" * 200, "ok:1", "sp ace"],
    "temperature": [-1.0, float("nan"), float("inf"), 1e9, 0.7],
    "top_p": [1.5, -0.1, float("nan"), 0.5],
    "top_k": [2**31 - 1, 5],
    "rule": ["bogus", "sample", "greedy"],
    "seed": [0, 2**63 - 1],
    "stop": [[""], ["y" * 80], ["a"] * 9, ["\n"]],
    "speculation": [3, 99, 1, 2],
    "model": ["gpt-9", "x" * 300],
}


def fuzz_request(rng: random.Random) -> bytes:
    """A valid short GenerateRequest with 0-2 fields mutated (mostly to invalid values), or random
    or corrupted bytes (bad protobuf, invalid UTF-8)."""
    if rng.random() < 0.1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
    req = pb.GenerateRequest(prompt=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, 3))
    for field in rng.sample(sorted(MUTATIONS), rng.choice([0, 1, 1, 2])):
        v = rng.choice(MUTATIONS[field])
        if field == "chat":
            req.ClearField("prompt")
            req.chat.SetInParent()
            for role, content in v:
                req.chat.messages.add(role=role, content=content)
        elif field == "stop":
            req.stop.extend(v)
        elif field in ("temperature", "top_p", "top_k", "rule", "seed"):
            setattr(req.sampling, field, v)
        else:
            setattr(req, field, v)
    body = req.SerializeToString()
    if rng.random() < 0.1:  # flip bytes
        b = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        body = bytes(b)
    return body


def test_fuzzed_requests_are_ok_or_invalid_and_the_server_stays_healthy(cluster, profile, report):
    import asyncio

    rng = random.Random(26)
    bodies = [fuzz_request(rng) for _ in range(profile["fuzz"])]

    async def go():
        codes = Counter()
        async with grpc.aio.insecure_channel(cluster["target"]) as ch:
            m = ch.unary_stream("/medusa.v1.Medusa/Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
            for body in bodies:
                try:
                    async for _ in m(body, metadata=(("authorization", f"Bearer {KEYS['acme']}"),), timeout=60):
                        pass
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                    assert "Traceback" not in (e.details() or "") and "Error:" not in (e.details() or ""), e.details()
        return codes

    codes = asyncio.run(go())
    report["fuzz"] = {"requests": len(bodies), "by_status": dict(codes), "seed": 26}
    # NOT_FOUND: a fuzzed request naming a model that is not served
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, codes
    with client(cluster) as c:
        assert c.health()[0] == "SERVING"


# ---------------------------------------------------------------- cancels


def test_cancelled_streams_leak_nothing(cluster, profile, report):
    n = profile["cancels"]
    with client(cluster) as c:
        for i in range(n):
            s = c.stream(messages=[{"role": "user", "content": f"Count from 1 to 50, take {i}."}], max_new_tokens=48)
            next(s)
            s.close()  # cancels the RPC after its first delta
    t_last = time.monotonic()
    deadline = time.monotonic() + 30
    first_clear = {}  # what settled when (seconds after the last cancel)
    while True:
        stats = engine_stats()
        busy = {r: (s["running"], s["waiting"], s["load"]) for r, s in stats.items() if s["load"] or s["running"] or s["waiting"]}
        conc = redis_client(cluster).zcard("medusa:conc:acme")
        with client(cluster) as c:
            details = c.health()[1]
        now = round(time.monotonic() - t_last, 2)
        for name, clear in (("engines_s", not busy), ("slots_s", conc == 0), ("ingress_s", details["ingress_in_flight"] == "0")):
            if clear:
                first_clear.setdefault(name, now)
        if not busy and conc == 0 and details["ingress_in_flight"] == "0":
            settled_s = time.monotonic() - t_last
            break
        assert time.monotonic() < deadline, f"after {n} cancels: engines {busy}, slots {conc}, health {details}"
        time.sleep(0.5)
    report["cancels"] = {"cancelled": n, "replicas_checked": len(stats), "leaked_rows": 0, "leaked_slots": 0,
                         "settled_after_s": round(settled_s, 2), "first_clear": first_clear}
    assert len(stats) == 2


# ---------------------------------------------------------------- tenants


def test_a_tenant_cannot_evict_or_read_another_tenants_sessions(cluster, report):
    q = {"role": "user", "content": "Tell me a fact about the sea."}
    with client(cluster, "zeta") as z, client(cluster, "acme") as a:
        first = z.generate(messages=[q], session_id="mine", max_new_tokens=6)
        for i in range(6):  # acme opens many sessions (its share is one kept session per replica)
            a.generate(messages=[{"role": "user", "content": f"Topic {i}?"}], session_id=f"flood-{i}", max_new_tokens=4)
        again = z.generate(messages=[q, {"role": "assistant", "content": first.text}, {"role": "user", "content": "More?"}],
                           session_id="mine", max_new_tokens=4)
    assert again.replica_id == first.replica_id and again.usage.reused_prompt_tokens > 0  # not evicted
    report["tenants"] = {"flood_sessions": 6, "victim_reused_tokens": again.usage.reused_prompt_tokens}


# ---------------------------------------------------------------- Redis restart


def test_redis_restart_mid_load_keeps_quotas_and_keys(cluster, profile, report):
    r = redis_client(cluster)
    r.hset("medusa:apikeys", hash_key(KEYS["redisy"]), "redisy")
    with client(cluster, "redisy") as c:
        assert c.generate(prompt="hi", max_new_tokens=2).usage.completion_tokens > 0  # cached positively now
    stop_at = time.monotonic() + profile["redis_load_s"]
    codes = Counter()

    def load(tenant):
        with client(cluster, tenant, retry=RetryPolicy(max_attempts=1)) as c:
            while time.monotonic() < stop_at:
                try:
                    c.generate(prompt="Say hello.", max_new_tokens=4)
                    codes["OK"] += 1
                except MedusaClientError as e:
                    codes[code_of(e)] += 1

    threads = [threading.Thread(target=load, args=(t,)) for t in ("tiny", "tiny", "acme", "redisy")]
    for t in threads:
        t.start()
    time.sleep(profile["redis_load_s"] / 3)
    t_kill = time.monotonic()
    cluster["redis"].kill()  # a crash, mid-load
    time.sleep(1.0)
    cluster["redis"] = cluster["redis"].restart()  # same port, password and append-only file
    down_s = time.monotonic() - t_kill
    for t in threads:
        t.join()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # no UNAUTHENTICATED during the outage
    r = redis_client(cluster)
    assert r.hget("medusa:apikeys", hash_key(KEYS["redisy"])) == b"redisy"  # persisted
    deadline = time.monotonic() + 15  # leases of requests cut by the crash expire (quota_lease_s 10)
    while r.zcard("medusa:conc:tiny") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.zcard("medusa:conc:tiny") == 0
    # tiny may run 2 at once: 5 concurrent long requests -> at most 2 admitted
    results = []

    def one():
        with client(cluster, "tiny", retry=RetryPolicy(max_attempts=1)) as c:
            try:
                c.generate(prompt="Count from 1 to 40:", max_new_tokens=24)
                results.append("OK")
            except MedusaClientError as e:
                results.append(code_of(e))

    ts = [threading.Thread(target=one) for _ in range(5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    report["redis_restart"] = {"outage_s": round(down_s, 1), "by_status": dict(codes),
                               "after_restart_5_concurrent_at_limit_2": dict(Counter(results))}
    assert results.count("OK") <= 2 + 1 and "RESOURCE_EXHAUSTED" in results  # (+1: a request that ended before the last began)


# ---------------------------------------------------------------- keys


def test_keys_are_in_no_log_trace_or_environment(cluster, report):
    import ray

    with client(cluster, tenant="rk-wrong-" + "e5" * 8) as c:
        for _ in range(5):
            with pytest.raises(MedusaClientError):
                c.generate(prompt="hi")
    raw = [k.encode() for k in KEYS.values()] + [b"rk-wrong-" + b"e5" * 8]
    found = []
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    files = [os.path.join(d, f) for d, _, fs in os.walk(session_dir) for f in fs] + [str(cluster["spans"])]
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(50_000_000)
        except OSError:
            continue
        found += [(path, k[:6]) for k in raw if k in data]
    me = os.getpid()
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:  # processes this test process started (Ray's GCS, raylet, workers, proxy, replicas, redis)
            p, chain = int(pid), set()
            while p > 1 and p not in chain:
                chain.add(p)
                with open(f"/proc/{p}/stat") as f:
                    p = int(f.read().rsplit(")", 1)[1].split()[1])
            if me in chain and int(pid) != me:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read()
                procs.append(pid)
                found += [(f"/proc/{pid}/environ", k[:6]) for k in raw if k in env]
        except (OSError, ValueError, IndexError):
            continue
    report["keys"] = {"files_searched": len(files), "processes_searched": len(procs), "found": len(found)}
    assert len(procs) >= 4 and not found, found


# ---------------------------------------------------------------- replica death


def test_a_replica_killed_mid_stream_ends_unavailable_and_traffic_moves_on(cluster, report):
    import ray

    with client(cluster) as c:
        s = c.stream(messages=[{"role": "user", "content": "Count from 1 to 100."}], max_new_tokens=60, session_id="doomed")
        next(s)
        replica = redis_client(cluster).get("medusa:session:acme:doomed").decode()  # recorded at the first token
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "Engine" in a["name"] and replica in a["name"]]
        assert len(names) == 1, names
        t_kill = time.monotonic()
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        with pytest.raises(MedusaClientError) as ei:
            list(s)
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE, ei.value
        ended_s = time.monotonic() - t_kill
        r = c.generate(prompt="Say hello.", max_new_tokens=4)  # the SDK retries UNAVAILABLE before a token
        recovered_s = time.monotonic() - t_kill
    assert r.replica_id != replica
    report["replica_kill"] = {"stream_ended_s": round(ended_s, 2), "next_request_ok_after_s": round(recovered_s, 2),
                              "status": ei.value.code.name}


# ---------------------------------------------------------------- drain (last: it stops admitting)


def test_drain_finishes_in_flight_streams_and_refuses_new_ones(cluster, report):
    drained = {}
    with client(cluster) as c, client(cluster, retry=RetryPolicy(max_attempts=1)) as c2:
        s = c.stream(messages=[{"role": "user", "content": "Count from 1 to 30."}], max_new_tokens=32)
        ids = list(next(s).token_ids)  # in flight
        t0 = time.monotonic()
        d = threading.Thread(target=lambda: drained.update(cluster["cluster"].drain(30)))
        d.start()
        time.sleep(0.5)
        with pytest.raises(MedusaClientError) as ei:
            c2.generate(prompt="new", max_new_tokens=2)
        for delta in s:
            ids.extend(delta.token_ids)
        d.join(60)
    report["drain"] = {"grace_s": 30, "drain_s": round(time.monotonic() - t0, 1), **drained,
                       "new_request_status": ei.value.code.name, "in_flight_stream_tokens": len(ids)}
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    assert drained == {"in_flight": 1, "finished": 1, "cancelled": 0} and len(ids) > 1
