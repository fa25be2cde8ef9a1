"""Plain service classes without Ray: the routing policy, settings, tenancy and quotas against a
private redis-server, session affinity entries with their TTL, incremental detokenisation, and
the whole request path (Ingress -> TokenizerService -> EngineReplica) behind a real grpc.aio
server driven by the client SDK. The engine here is a scripted stand-in; the real Engine runs in
tests/integration."""
import asyncio
import dataclasses
import threading

import grpc
import pytest

pytest.importorskip("redis")

from medusa.client import (AuthenticationError, InvalidRequestError, MedusaClient, QuotaExceededError,  # noqa: E402
                           RetryPolicy)
from medusa.errors import RequestError  # noqa: E402
from services import telemetry  # noqa: E402
from services.config import ConfigError, Settings, TenantLimits  # noqa: E402
from services.engine_replica import EngineReplica  # noqa: E402
from services.ingress import Ingress  # noqa: E402
from services.local import LocalHandle, start_server  # noqa: E402
from services.redis_guard import RedisGuard  # noqa: E402
from services.redis_local import free_port, start_redis  # noqa: E402
from services.routing import SessionStore, route, session_key  # noqa: E402
from services.tenancy import AuthError, KeyStore, Quota, QuotaError, bearer_key, hash_key, parse_env_keys  # noqa: E402
from services.detok import decode_delta  # noqa: E402
from services.tokenizer_service import TokenizerService  # noqa: E402

# ---------------------------------------------------------------- fixtures and stand-ins


@pytest.fixture(scope="module")
def redis_url():
    r = start_redis()
    yield r.url
    r.stop()


def run(coro):
    return asyncio.run(coro)


class CharTokenizer:
    """medusa.tokenizer.Tokenizer's surface over characters (id = code point + 10)."""

    eos_token_ids = (3,)
    has_chat_template = True

    def encode(self, text):
        return [ord(c) + 10 for c in text]

    def encode_chat(self, messages):
        if any(m.get("role") not in ("system", "user", "assistant") for m in messages):
            raise RequestError("chat messages need a role (system, user, assistant) and text content")
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def token_text(self, i):
        return chr(i - 10) if i >= 10 else ""


@dataclasses.dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    new_tokens: int
    steps: int
    mean_accepted: float
    reused_tokens: int
    ttft_s: float
    seconds: float
    tree: str


@dataclasses.dataclass(frozen=True)
class Event:
    request_id: str
    tokens: list
    finish_reason: str | None = None
    stats: Stats | None = None
    logprobs: list | None = None
    beams: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Hyp:
    """medusa.decoding.beam.Hypothesis's surface."""

    tokens: tuple
    score: float


@dataclasses.dataclass(frozen=True)
class LP:
    """medusa.decoding.logprobs.TokenLogprob's surface."""

    token_id: int
    logprob: float
    top: tuple = ()


def scripted_logprobs(out: list[int], k: int) -> list[LP]:
    """Made-up values: output token j has logprob -(j + 1) / 8; its alternatives are the
    token itself, then the ids just after it, each 1 lower."""
    lps = []
    for j, t in enumerate(out):
        v = -(j + 1) / 8
        lps.append(LP(t, v, tuple((t + m, v - m) for m in range(k))))
    return lps


class ScriptedEngine:
    """Engine API stand-in: echoes the prompt's last tokens, two per step, keeps session
    prefixes so a later turn reports reused tokens."""

    def __init__(self):
        self.sessions = {}
        self.submitted = []
        self.cancelled = []

    def submit(self, req):
        if req.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be >= 1")
        self.submitted.append(req)
        reused = 0
        if req.session_id in self.sessions:
            kept = self.sessions[req.session_id]
            while reused < min(len(kept), len(req.prompt_ids)) and kept[reused] == req.prompt_ids[reused]:
                reused += 1
        out = [t for t in reversed(req.prompt_ids)][: req.max_new_tokens]
        if req.session_id:
            self.sessions[req.session_id] = list(req.prompt_ids) + out
        engine = self

        lps = scripted_logprobs(out, req.logprobs) if getattr(req, "logprobs", None) is not None else None

        class Handle:
            async def __aiter__(self):
                if getattr(req, "beams", 1) > 1:  # beam search: everything on the final event
                    hyps = tuple(Hyp(tuple(out[k:]), -1.0 - k) for k in range(req.num_return))
                    st = Stats(len(req.prompt_ids), len(out), len(out), 1.0, 0, 0.01, 0.02, "ar")
                    yield Event(req.request_id, out, "length", st, beams=hyps)
                    return
                for i in range(0, len(out), 2):
                    yield Event(req.request_id, out[i:i + 2], logprobs=lps[i:i + 2] if lps is not None else None)
                    await asyncio.sleep(0)
                st = Stats(len(req.prompt_ids), len(out), (len(out) + 1) // 2, 2.0, reused, 0.01, 0.02, "tree16")
                yield Event(req.request_id, [], "length", st)

            def cancel(self):
                engine.cancelled.append(req.request_id)

        return Handle()

    def load(self):
        return 0

    def stats(self):
        return {"running": 0}


# ---------------------------------------------------------------- routing policy


def test_route_prefers_the_session_replica_then_least_loaded():
    d = route("b", {"a": 0, "b": 5, "c": 1})
    assert d.reason == "affinity" and d.ranks == (("b",), ("a", "c"))
    d = route(None, {"a": 3, "b": 0, "c": 0})
    assert d.reason == "new" and d.ranks == (("b", "c"), ("a",))
    d = route("gone", {"a": 2, "b": 1})
    assert d.reason == "reassigned" and d.ranks[0] == ("b",)
    assert route(None, {"a": None, "b": 4}).ranks[0] == ("a",)  # unprobed load counts as 0
    assert route(None, {"a": 1}, has_session=False).reason == "none"
    assert route("a", {}).ranks == ()


# ---------------------------------------------------------------- settings and tenancy


def test_settings_parse_and_reject_unknown_fields():
    s = Settings.parse({"tenant_limits": {"t": {"tokens_per_minute": 100}}, "api_keys": [{"tenant": "t", "key": "k"}]})
    assert s.limits_for("t") == TenantLimits(None, 100) and s.limits_for("other") == TenantLimits()
    for bad in ({"nope": 1}, {"max_batch": 0}, {"tenant_limits": {"t": {"rpm": 1}}}, {"api_keys": [{"tenant": "t"}]}):
        with pytest.raises(ConfigError):
            Settings.parse(bad)


def test_tensor_parallel_setting_places_a_replicas_ranks_on_one_node():
    """tensor_parallel_size N: the Engine deployment asks for N bundles (STRICT_PACK), each of
    engine_num_cpus / engine_num_gpus (GPU bundles only on GPUs); on GPUs one GPU per rank."""
    pytest.importorskip("ray")
    from services.app import engine_deployment

    cpu = engine_deployment(Settings.parse({"tensor_parallel_size": 3, "engine_num_cpus": 0.5}))
    assert cpu._replica_config.placement_group_bundles == [{"CPU": 0.5}] * 3
    assert cpu._replica_config.placement_group_strategy == "STRICT_PACK"
    gpu = engine_deployment(Settings.parse({"tensor_parallel_size": 2, "device": "cuda", "engine_num_gpus": 1,
                                            "engine_num_cpus": 4}))
    assert gpu._replica_config.placement_group_bundles == [{"CPU": 4, "GPU": 1}] * 2
    assert engine_deployment(Settings.parse({}))._replica_config.placement_group_bundles is None
    for bad in ({"tensor_parallel_size": 0}, {"tensor_parallel_size": 2, "device": "cuda", "engine_num_gpus": 2},
                {"tensor_parallel_size": 2, "device": "cuda:1", "engine_num_gpus": 1}):
        with pytest.raises(ConfigError):
            Settings.parse(bad)


def test_keys_are_hashed_and_bearer_parsed(redis_url, tmp_path):
    assert bearer_key([("authorization", "Bearer abc ")]) == "abc"
    assert bearer_key([("Authorization", "basic abc")]) is None and bearer_key([]) is None
    assert parse_env_keys("a:k1, b:k2") == {hash_key("k1"): "a", hash_key("k2"): "b"}
    with pytest.raises(ValueError):
        parse_env_keys("nokey")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenant:key lines\nenvt:k-env\n")
    s = Settings.parse({"api_keys": [{"tenant": "cfg", "key_sha256": hash_key("secret")}], "api_keys_file": str(keys_file)})
    guard = RedisGuard(redis_url)
    ks = KeyStore.from_settings(s, guard)
    assert "secret" not in repr(ks.hashed) and "k-env" not in repr(ks.hashed)

    async def go():
        await guard.client().hset("medusa:apikeys", hash_key("from-redis"), "redist")
        got = [await ks.tenant("secret"), await ks.tenant("k-env"), await ks.tenant("from-redis")]
        for bad in (None, "wrong"):
            with pytest.raises(AuthError):
                await ks.tenant(bad)
        return got

    assert run(go()) == ["cfg", "envt", "redist"]


def test_quota_concurrency_and_token_bucket(redis_url):
    s = Settings.parse({"tenant_limits": {"q": {"max_concurrent": 1, "tokens_per_minute": 100}}})

    async def go():
        quota = Quota(s, RedisGuard(redis_url))
        lease = await quota.acquire("q", 60)
        with pytest.raises(QuotaError, match="in flight"):
            await quota.acquire("q", 10)
        await quota.release(lease, 30)  # 30 of the 60 reserved were used: 30 come back
        lease = await quota.acquire("q", 60)  # 100 - 30 = 70 left (plus a little refill)
        await quota.release(lease, 60)
        with pytest.raises(QuotaError, match="tokens per minute"):
            await quota.acquire("q", 60)
        with pytest.raises(QuotaError, match="limit is 100"):
            await quota.acquire("q", 101)
        lease = await quota.acquire("other", 10**6)  # no limits for other tenants
        return lease.reserved_tokens == 0 and not lease.holds_slot

    assert run(go())


class Recorder:
    def __init__(self):
        self.redis = []

    def redis_unavailable(self, component):
        self.redis.append(component)


def test_redis_down_means_no_affinity_and_open_quotas(caplog):
    rec = Recorder()
    guard = RedisGuard(f"redis://127.0.0.1:{free_port()}/0", rec, timeout_s=0.2)
    s = Settings.parse({"tenant_limits": {"q": {"max_concurrent": 1, "tokens_per_minute": 100}}})

    async def go():
        store = SessionStore(guard, 60)
        assert await store.get("t", "s") is None
        await store.put("t", "s", "r1")  # skipped while Redis is down
        lease = await Quota(s, guard).acquire("q", 50)
        await Quota(s, guard).acquire("q", 50)  # limits not enforced without Redis
        return lease

    with caplog.at_level("WARNING"):
        lease = run(go())
    assert not lease.holds_slot and rec.redis == ["sessions"]  # later calls skip Redis during the cooldown
    assert sum("unreachable" in r.message for r in caplog.records) == 1


def test_session_entry_has_a_ttl(redis_url):
    guard = RedisGuard(redis_url)

    async def go():
        store = SessionStore(guard, 120)
        await store.put("t1", "s1", "replica-a")
        c = guard.client()
        return await store.get("t1", "s1"), await store.get("t2", "s1"), await c.ttl(session_key("t1", "s1"))

    got, other_tenant, ttl = run(go())
    assert got == "replica-a" and other_tenant is None and 0 < ttl <= 120


def test_decode_delta_holds_back_incomplete_characters():
    class Bytes:
        def decode(self, ids):  # ids are UTF-8 bytes
            return bytes(ids).decode("utf-8", errors="replace")

    ids = list("héllo".encode())
    text, p, r = "", 0, 0
    pieces = []
    for i in range(1, len(ids) + 1):
        t, p2, r2 = decode_delta(Bytes(), ids[:i], p, r)
        pieces.append(t)
        if t:
            p, r = p2, r2
        text += t
    assert text == "héllo" and "" in pieces  # the half of "é" waited for its second byte


# ---------------------------------------------------------------- the request path over gRPC


@pytest.fixture(scope="module")
def stack(redis_url):
    """Ingress + tokenizer + engine replica (scripted engine) on a grpc.aio server in a thread."""
    settings = Settings.parse({
        "redis_url": redis_url, "tracing": "memory", "default_max_new_tokens": 6, "max_new_tokens_limit": 64,
        "api_keys": [{"tenant": "acme", "key": "k-acme"}, {"tenant": "zeta", "key": "k-zeta"},
                     {"tenant": "tiny", "key": "k-tiny"}],
        "tenant_limits": {"tiny": {"tokens_per_minute": 30}},
    })
    engine = ScriptedEngine()
    tok = TokenizerService(CharTokenizer(), tracing="memory")
    replica = EngineReplica(engine, replica_id="replica-1", eos=(3,), info={"id": "char", "heads": "medusa"}, tracing="memory")
    ingress = Ingress(LocalHandle(tok), LocalHandle(replica), settings)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(start_server(ingress), loop).result()
    yield {"target": f"127.0.0.1:{port}", "engine": engine, "ingress": ingress, "redis_url": redis_url}
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
    loop.call_soon_threadsafe(loop.stop)


def client(stack, key="k-acme"):
    return MedusaClient(stack["target"], api_key=key, retry=RetryPolicy(max_attempts=1), timeout=10)


def test_stream_returns_engine_tokens_as_text(stack):
    with client(stack) as c:
        r = c.generate(prompt="abcd", max_new_tokens=3, stop=["zz"])
        assert r.text == "dcb" and r.token_ids == [ord(x) + 10 for x in "dcb"]
        assert r.finish_reason == "length" and r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3
        assert r.stats.mean_accepted == 2.0 and r.stats.tree == "tree16" and r.replica_id == "replica-1"
        assert "".join(d.text for d in c.stream(prompt="xyz", max_new_tokens=3)) == "zyx"
        assert c.tokenize("ab") == [107, 108]
        assert c.list_models()[0]["heads"] == "medusa"
        status, details = c.health()
        assert status == "SERVING" and details["redis"] == "ok"
    req = stack["engine"].submitted[0]
    assert req.stop_sequences == ((ord("z") + 10,) * 2,) and req.sampling.greedy


def test_grpc_logprobs_reach_the_client_and_follow_stop_trimming(stack):
    with client(stack) as c:
        r = c.generate(prompt="abcd", max_new_tokens=3, logprobs=2)
        assert [(e.token, e.token_id, e.text_offset) for e in r.logprobs] == [(ch, ord(ch) + 10, i) for i, ch in enumerate("dcb")]
        assert [e.logprob for e in r.logprobs] == pytest.approx([-1 / 8, -2 / 8, -3 / 8])
        assert [[t.token for t in e.top] for e in r.logprobs] == [[ch, chr(ord(ch) + 1)] for ch in "dcb"]
        assert stack["engine"].submitted[-1].logprobs == 2
        streamed = [e.token for d in c.stream(prompt="xyz", max_new_tokens=3, logprobs=0) for e in d.logprobs]
        assert streamed == list("zyx")
        cut = c.generate(prompt="abcxyz", max_new_tokens=6, stop=["cb"], logprobs=0)  # "cb..." trimmed with its logprobs
        assert cut.text == "zyx" and [e.token for e in cut.logprobs] == list("zyx")
        assert c.generate(prompt="abcd", max_new_tokens=3).logprobs is None
        with pytest.raises(InvalidRequestError, match="at most 5"):
            c.generate(prompt="abcd", max_new_tokens=3, logprobs=6)


def test_grpc_beam_search_fields_reach_the_engine_and_beams_the_client(stack):
    with client(stack) as c:
        r = c.generate(prompt="abcd", max_new_tokens=3, beams=4, length_penalty=0.5, early_stopping="never", num_return=2)
        assert r.text == "dcb" and r.finish_reason == "length"
        assert [(b.text, b.score) for b in r.beams] == [("dcb", -1.0), ("cb", -2.0)]
        req = stack["engine"].submitted[-1]
        assert (req.beams, req.length_penalty, req.early_stopping, req.num_return) == (4, 0.5, "never", 2)
        c.generate(prompt="abcd", max_new_tokens=3, beams=2, early_stopping=True)
        req = stack["engine"].submitted[-1]
        assert (req.beams, req.length_penalty, req.early_stopping, req.num_return) == (2, 1.0, True, 1)
        assert c.generate(prompt="abcd", max_new_tokens=3).beams is None
        for kw, msg in [(dict(stop=["x"]), "stop strings"), (dict(logprobs=1), "logprobs"),
                        (dict(session_id="s1"), "sessions"), (dict(early_stopping="maybe"), "early_stopping")]:
            with pytest.raises(InvalidRequestError, match=msg):
                c.generate(prompt="abcd", max_new_tokens=3, beams=2, **kw)
        with pytest.raises(InvalidRequestError, match="need beams > 1"):
            c.generate(prompt="abcd", max_new_tokens=3, num_return=2, beams=1, length_penalty=2.0)


def test_logprob_entries_wait_for_their_text_and_go_with_trimmed_text():
    from medusa.proto.v1 import medusa_pb2 as pb
    from services.logprobs import LogprobStream

    def entry(name):
        return pb.TokenLogprob(token=name)

    s = LogprobStream()
    for name, chars in (("ab", 2), ("half", 0), ("é", 1), ("S", 1)):  # "half": a token that adds no text yet
        s.add(entry(name), chars)
    assert [e.token for e in s.release(2)] == ["ab", "half"]  # "é" and "S" are held back with their text
    assert [e.text_offset for e in s.release(0)] == []
    assert [(e.token, e.text_offset) for e in s.release(2, final=True)] == [("é", 2), ("S", 3)]
    s = LogprobStream()
    for name, chars in (("xy", 2), ("zS", 2), ("TOP", 3), ("!", 1)):  # stop string "STOP": the text is cut after "xyz"
        s.add(entry(name), chars)
    assert [e.token for e in s.release(3, matched=True)] == ["xy", "zS"]  # "zS" keeps a character
    assert s.release(5, final=True) == []


def test_sessions_are_namespaced_and_recorded(stack):
    import redis

    with client(stack) as a, client(stack, "k-zeta") as z:
        msgs = [{"role": "user", "content": "hi"}]
        first = a.generate(messages=msgs, session_id="conv-1", max_new_tokens=4)
        second = a.generate(messages=msgs + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}],
                            session_id="conv-1", max_new_tokens=4)
        other = z.generate(messages=msgs, session_id="conv-1", max_new_tokens=4)
    assert first.usage.reused_prompt_tokens == 0 and second.usage.reused_prompt_tokens > 0
    assert other.usage.reused_prompt_tokens == 0  # same session name, other tenant: no shared KV
    ids = {r.session_id for r in stack["engine"].submitted}
    assert {"acme/~0", "zeta/~0"} <= ids  # each tenant's own session slots (services.engine_replica)
    r = redis.Redis.from_url(stack["redis_url"])
    assert r.get(session_key("acme", "conv-1")) == b"replica-1" and 0 < r.ttl(session_key("acme", "conv-1")) <= 1800


@pytest.mark.parametrize("kwargs,reason", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="a", temperature=-1.0), "temperature"),
    (dict(prompt="a", rule="sample"), "temperature > 0"),
    (dict(prompt="a", max_new_tokens=100), "limit of 64"),
    (dict(prompt="a", session_id="../other"), "session_id"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "role"),
    (dict(prompt="a", stop=[""] ), "stop sequences"),
])
def test_malformed_requests_are_invalid_argument(stack, kwargs, reason):
    with client(stack) as c:
        with pytest.raises(InvalidRequestError, match=reason) as ei:
            c.generate(**kwargs)
        assert "Traceback" not in ei.value.details
        assert c.generate(prompt="ok", max_new_tokens=2).text == "ko"  # still healthy


def test_auth_and_quota_codes(stack):
    with client(stack, key=None) as c:
        with pytest.raises(AuthenticationError, match="missing API key"):
            c.generate(prompt="a")
    with client(stack, key="wrong") as c:
        with pytest.raises(AuthenticationError, match="unknown API key"):
            c.tokenize("a")
    with client(stack, key="k-tiny") as c:
        c.generate(prompt="abcdefghij", max_new_tokens=10)  # 20 of 30 tokens this minute
        with pytest.raises(QuotaExceededError, match="tokens per minute") as ei:
            c.generate(prompt="abcdefghij", max_new_tokens=10)
        assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with client(stack) as c:
        assert c.health()[0] == "SERVING"


def test_one_trace_spans_every_component(stack):
    with client(stack) as c:
        r = c.generate(prompt="trace me", max_new_tokens=2)
    spans = telemetry.finished_spans()
    ing = [s for s in spans if s["name"] == "ingress.Generate" and s["attributes"].get("medusa.request_id") == r.request_id]
    assert len(ing) == 1
    names = {s["name"] for s in spans if s["trace_id"] == ing[0]["trace_id"]}
    assert {"ingress.Generate", "router", "tokenizer.encode", "engine.prefill", "engine.decode"} <= names
    decode = next(s for s in spans if s["trace_id"] == ing[0]["trace_id"] and s["name"] == "engine.decode")
    assert decode["attributes"]["medusa.completion_tokens"] == 2 and decode["attributes"]["medusa.tenant"] == "acme"


def test_service_abort_survives_pickling():
    """Ray carries the ingress's exception to the proxy by pickling it."""
    import pickle

    from services.ingress import ServiceAbort

    e = pickle.loads(pickle.dumps(ServiceAbort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")))
    assert (e.code, e.details, str(e)) == (grpc.StatusCode.UNAUTHENTICATED, "unknown API key", "unknown API key")


def test_coalesce_merges_events_a_slow_consumer_missed():
    from services.ingress import coalesce

    async def engine():
        yield {"tokens": [1], "replica": "r"}
        for t in range(2, 6):
            yield {"tokens": [t]}
        yield {"tokens": [], "finish_reason": "length", "stats": {"steps": 5}}

    async def consume():
        out = []
        async for ev in coalesce(engine()):
            out.append(ev)
            await asyncio.sleep(0.01)  # busy (detokenising) while the engine runs ahead
        return out

    out = run(consume())
    assert [t for ev in out for t in ev["tokens"]] == [1, 2, 3, 4, 5]
    assert len(out) < 6 and out[0]["replica"] == "r" and out[-1]["finish_reason"] == "length"
    assert all("replica" not in ev for ev in out[1:])

    async def failing():
        yield {"tokens": [1]}
        raise RuntimeError("replica died")

    async def consume_failing():
        async for _ in coalesce(failing()):
            pass

    with pytest.raises(RuntimeError, match="replica died"):
        run(consume_failing())


def test_ray_request_router_applies_the_policy():
    """services.router.SessionAffinityRouter.choose_replicas over stand-in replicas (no Ray
    cluster): the session's replica ranks first; a vanished one is replaced by the least loaded."""
    pytest.importorskip("ray")
    from ray.serve._private.request_router.common import PendingRequest, ReplicaQueueLengthCache

    from services.router import SessionAffinityRouter

    class Rid:
        def __init__(self, u):
            self.unique_id = u

        def __hash__(self):
            return hash(self.unique_id)

        def __eq__(self, o):
            return self.unique_id == o.unique_id

    class Replica:
        def __init__(self, u):
            self.replica_id = Rid(u)

    async def go():
        router = SessionAffinityRouter.__new__(SessionAffinityRouter)
        router._replica_queue_len_cache = ReplicaQueueLengthCache()
        router.initialize_state(tracing=None)
        reps = [Replica("a"), Replica("b"), Replica("c")]
        router._replica_queue_len_cache.update(reps[0].replica_id, 3)
        router._replica_queue_len_cache.update(reps[1].replica_id, 0)
        router._replica_queue_len_cache.update(reps[2].replica_id, 1)

        def pending(affinity):
            return PendingRequest(args=[{"prompt_ids": [1], "session": "t/s", "affinity": affinity}], kwargs={}, metadata=None)

        ids = lambda ranks: [[r.replica_id.unique_id for r in rank] for rank in ranks]  # noqa: E731
        p = pending("a")
        hit = ids(await router.choose_replicas(reps, p))
        gone = ids(await router.choose_replicas(reps, pending("zz")))
        plain = ids(await router.choose_replicas(reps, None))
        return hit, gone, plain, p.routing_context.should_backoff

    hit, gone, plain, backoff = run(go())
    assert hit == [["a"], ["b", "c"]] and gone == [["b"], ["c", "a"]] and plain[0] == ["b"] and backoff


def test_ingress_detokenises_locally_with_the_tokenizer_services_decoder():
    """With a fast tokenizer, the ingress streams text with the decoder the tokenizer service
    hands out (tokenizer.json), and the text equals the remote path's."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models

    vocab = {"[UNK]": 0, "▁Hello": 1, "▁wor": 2, "ld": 3, "!": 4, "▁a": 5, "b": 6}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.decoder = decoders.Metaspace()

    class Fast(CharTokenizer):
        hf = type("HF", (), {"backend_tokenizer": tk})()

        def encode(self, text):
            return [5, 6]

        def decode(self, ids):
            return tk.decode(ids, skip_special_tokens=True)

    class Echo(ScriptedEngine):
        def submit(self, req):
            return super().submit(dataclasses.replace(req, prompt_ids=[4, 3, 2, 1]))

    class Counting(TokenizerService):
        calls = 0

        def detokenize(self, *a):
            Counting.calls += 1
            return super().detokenize(*a)

    async def go(local):
        settings = Settings.parse({"require_auth": False, "local_detokenize": local})
        ing = Ingress(LocalHandle(Counting(Fast())), LocalHandle(EngineReplica(Echo(), replica_id="r")), settings)
        from medusa.proto.v1 import medusa_pb2 as pb

        out = [m async for m in ing.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=4))]
        return "".join(m.delta.text for m in out if m.WhichOneof("event") == "delta")

    local_text = run(go(True))
    assert Counting.calls == 0
    remote_text = run(go(False))
    assert Counting.calls > 0
    assert local_text == remote_text == "Hello world!"


def test_engine_replica_cancels_when_the_caller_goes_away():
    engine = ScriptedEngine()
    replica = EngineReplica(engine, replica_id="r")

    async def go():
        gen = replica.generate({"prompt_ids": [11, 12, 13, 14, 15, 16], "max_new_tokens": 6, "sampling": {}})
        admitted = await gen.__anext__()  # sent as soon as the engine took the request
        assert admitted == {"tokens": [], "admitted": True, "replica": "r"}
        first = await gen.__anext__()
        await gen.aclose()
        bad = [ev async for ev in replica.generate({"prompt_ids": [1], "max_new_tokens": 2, "sampling": {"temperature": -1}})]
        return first, bad

    first, bad = run(go())
    assert first["replica"] == "r" and first["tokens"] and engine.cancelled == [engine.submitted[0].request_id]
    assert bad == [{"error": "invalid_argument", "message": "temperature must be >= 0, got -1", "replica": "r"}]


def test_trace_exporter_follows_the_otel_variables(monkeypatch):
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert telemetry.exporter_name() == "none" and telemetry.exporter_name("console") == "console"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert telemetry.exporter_name() == "otlp"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    assert telemetry.exporter_name() == "console"


# ---------------------------------------------------------------- metrics


class _Series:
    """Records what a ray.serve.metrics series is asked to do."""

    def __init__(self):
        self.calls = []

    def inc(self, value=1, tags=None):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))


def test_metrics_queue_time_and_acceptance_per_position():
    """vLLM's request_queue_time_seconds (the engine's per-request queue seconds) and
    spec_decode_num_accepted_tokens_per_pos (the engine's cumulative per-position counts,
    exported as counter increments)."""
    from services.metrics import Metrics

    m = Metrics(enabled=False)
    series = {}
    for name in ("_prompt", "_generation", "_success", "_e2e", "_engine_ttft", "_running", "_waiting", "_kv", "_drafts",
                 "_draft_tokens", "_accepted_tokens", "_accepted_per_pos", "_queue_time"):
        series[name] = _Series()
        setattr(m, name, series[name])
    m._pos_seen = []
    m.enabled = True
    m.finished(prompt_tokens=5, new_tokens=4, reused_tokens=0, finish_reason="length", seconds=0.5, ttft_s=0.2, steps=2,
               mean_accepted=2.0, draft_depth=3, queue_s=0.125)
    assert series["_queue_time"].calls == [("observe", 0.125, None)]
    m.engine_state({"running": 1, "kv_rows": 2, "accepted_per_pos": [4, 2]})
    m.engine_state({"running": 0, "kv_rows": 2, "accepted_per_pos": [5, 2, 1]})
    m.engine_state({"running": 0, "kv_rows": 2, "accepted_per_pos": [5, 2, 1]})  # nothing new
    per_pos = [(v, t["position"]) for _, v, t in series["_accepted_per_pos"].calls]
    assert per_pos == [(4, "0"), (2, "1"), (1, "0"), (1, "2")]


def test_replica_reports_queue_seconds_to_metrics():
    """EngineReplica hands the engine's RequestStats.queue_s to Metrics.finished."""
    import types

    from opentelemetry import trace

    from services.metrics import Metrics

    seen = {}

    class Rec(Metrics):
        def finished(self, **kw):
            seen.update(kw)

    replica = EngineReplica(ScriptedEngine(), replica_id="r", eos=(3,), metrics=Rec(enabled=False), tracing="memory")
    stats = types.SimpleNamespace(new_tokens=2, reused_tokens=0, steps=1, mean_accepted=2.0, tree="ar", prompt_tokens=3,
                                  seconds=0.3, ttft_s=0.1, queue_s=0.05)
    replica._annotate(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT), stats, "length")
    assert seen["queue_s"] == 0.05
