"""Regression tests of issue 26 (production hardening), one or more per defect, without Ray:
the request path (Ingress -> TokenizerService -> EngineReplica) behind a real grpc.aio server,
a real redis-server on a free port, and the client SDK. Engines are scripted stand-ins that
fail the way a real replica does (a Ray actor error by class name, a replica that never
admits, a KV pool that keeps a few sessions)."""
import asyncio
import collections
import logging
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

pytest.importorskip("redis")

from medusa.client import (AsyncMedusaClient, InvalidRequestError, MedusaClient, QuotaExceededError,  # noqa: E402
                           RetryPolicy, UnavailableError)
from medusa.client.errors import MedusaClientError  # noqa: E402
from medusa.errors import RequestError  # noqa: E402
from medusa.proto.v1 import medusa_pb2 as pb  # noqa: E402
from services import launch  # noqa: E402
from services.config import ConfigError, Settings  # noqa: E402
from services.engine_replica import EngineReplica  # noqa: E402
from services.ingress import Ingress  # noqa: E402
from services.local import LocalHandle, start_server  # noqa: E402
from services.redis_guard import RedisGuard  # noqa: E402
from services.redis_local import start_redis  # noqa: E402
from services.tenancy import AuthError, KeyStore, Quota, QuotaError, hash_key, parse_env_keys, parse_keys_file  # noqa: E402
from services.tokenizer_service import TokenizerService  # noqa: E402
from test_services import CharTokenizer, Event, ScriptedEngine, Stats  # noqa: E402

KEYS = [{"tenant": "acme", "key": "k-acme"}, {"tenant": "zeta", "key": "k-zeta"}, {"tenant": "tiny", "key": "k-tiny"}]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def redis_server():
    r = start_redis()
    yield r
    r.stop()


class Stack:
    """Ingress over a grpc.aio server on its own event loop thread."""

    def __init__(self, settings: dict, engine=None, tokenizer=None, engine_handle=None, info=None):
        self.settings = Settings.parse({"api_keys": KEYS, "tracing": None, **settings})
        self.engine = engine or ScriptedEngine()
        self.tokenizer = tokenizer or TokenizerService(CharTokenizer())
        self.replica = EngineReplica(self.engine, replica_id="replica-1", eos=(3,),
                                     info=info if info is not None else {"id": "char", "heads": "medusa"})
        self.ingress = Ingress(LocalHandle(self.tokenizer), engine_handle or LocalHandle(self.replica), self.settings)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, port = self.call(start_server(self.ingress))
        self.target = f"127.0.0.1:{port}"

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, key="k-acme", **kw):
        kw.setdefault("retry", RetryPolicy(max_attempts=1))
        kw.setdefault("timeout", 10)
        return MedusaClient(self.target, api_key=key, **kw)

    def close(self):
        self.call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def make_stack():
    made = []

    def make(settings=None, **kw):
        s = Stack(settings or {}, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# ------------------------------------------------ 1. quota slots: leases that expire, no inversion


def test_quota_slots_survive_a_redis_restart(redis_server):
    """Releases after a Redis restart used to DECR a fresh counter below zero: a tenant limited
    to 2 then ran 4. Leases are removed by id, so a restart can only forget slots."""
    r = start_redis()
    s = Settings.parse({"tenant_limits": {"q": {"max_concurrent": 2}}})

    async def phase(guard, n):
        quota = Quota(s, guard)
        got = []
        for _ in range(n):
            try:
                got.append(await quota.acquire("q", 1))
            except QuotaError:
                break
        return quota, got

    try:
        quota, leases = run(phase(RedisGuard(r.url), 2))
        assert len(leases) == 2
        r = r.restart()  # empty: nothing on disk
        guard = RedisGuard(r.url)

        async def release_then_count():
            q = Quota(s, guard)
            for lease in leases:
                await q.release(lease, 1)
            _, again = await phase(guard, 5)
            return len(again)

        assert run(release_then_count()) == 2  # the limit holds (4 before the fix)
    finally:
        r.stop()


def test_a_lost_release_expires_with_its_lease(redis_server):
    s = Settings.parse({"quota_lease_s": 1, "tenant_limits": {"lost": {"max_concurrent": 1}}})

    async def go():
        quota = Quota(s, RedisGuard(redis_server.url))
        await quota.acquire("lost", 1)  # the ingress holding it crashes: never released
        with pytest.raises(QuotaError, match="in flight") as ei:
            await quota.acquire("lost", 1)
        assert ei.value.retry_after_s is not None
        await asyncio.sleep(1.3)
        held = await quota.acquire("lost", 1)  # the lease expired
        await quota.renew(held, force=True)  # a running stream keeps its slot past the period
        await asyncio.sleep(0.6)
        await quota.renew(held, force=True)
        await asyncio.sleep(0.6)
        with pytest.raises(QuotaError):
            await quota.acquire("lost", 1)
        await quota.release(held, 1)
        await quota.release(held, 1)  # idempotent: never a negative count
        return await quota.acquire("lost", 1)

    assert run(go()).holds_slot


# ------------------------------------------------ 2. raw keys stay out of Ray's environment


def test_raw_keys_never_reach_the_cluster_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_API_KEYS", "acme:raw-secret-1")
    # The ingress reads keys from the serve config and its keys file only, never the variable.
    ks = KeyStore.from_settings(Settings.parse({}))
    with pytest.raises(AuthError):
        run(ks.tenant("raw-secret-1"))
    # The launcher hashes the variable and removes it before Ray starts (children inherit the rest).
    seen = {}
    with_keys = launch.with_keys

    def stop_here(args, env_keys):
        seen["env"] = os.environ.get("MEDUSA_API_KEYS")
        seen["args"] = repr(with_keys(args, env_keys)[0])
        raise RuntimeError("stop before Ray")

    monkeypatch.setattr(launch, "with_keys", stop_here)
    with pytest.raises(RuntimeError, match="before Ray"):
        launch.start({})
    assert seen["env"] is None and "raw-secret-1" not in seen["args"] and hash_key("raw-secret-1") in seen["args"]
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MEDUSA_API_KEYS'))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "None"


def test_keys_file_is_hashed_and_errors_never_echo_a_key(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# comment\nacme:k-file\nzeta:sha256:{hash_key('k-hashed')}\n")
    ks = KeyStore.from_settings(Settings.parse({"api_keys_file": str(f)}))
    assert "k-file" not in repr(ks.hashed)
    assert run(ks.tenant("k-file")) == "acme" and run(ks.tenant("k-hashed")) == "zeta"
    for bad in ("just-a-secret-value", "tenant:"):
        with pytest.raises(ConfigError) as ei:
            parse_keys_file(bad)
        assert "secret-value" not in str(ei.value)
    with pytest.raises(ValueError) as ei:
        parse_env_keys("a:k1,leakedsecret")
    assert "leakedsecret" not in str(ei.value)
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        KeyStore.from_settings(Settings.parse({"api_keys_file": str(tmp_path / "missing")}))


# ------------------------------------------------ 3. Redis behind AUTH; a Redis blip keeps tenants in


def test_redis_keys_need_auth_and_survive_a_blip():
    import redis

    r = start_redis(password="pw-" + "x" * 8)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=r.port).hset("medusa:apikeys", hash_key("intruder"), "acme")
        guard = RedisGuard(r.url, timeout_s=0.2)
        ks = KeyStore({}, guard, cache_s=60)

        async def go():
            await guard.client().hset("medusa:apikeys", hash_key("k-redis"), "redist")
            first = await ks.tenant("k-redis")
            r.kill()  # Redis goes away
            during = await ks.tenant("k-redis")  # cached positive lookup
            with pytest.raises(AuthError):
                await ks.tenant("never-seen")
            return first, during

        assert run(go()) == ("redist", "redist")
    finally:
        r.stop()


# ------------------------------------------------ 4. size limits before tokenisation; Tokenize quota


class CountingTokenizer(TokenizerService):
    def __init__(self):
        super().__init__(CharTokenizer())
        self.encoded = 0

    def encode(self, req):
        self.encoded += 1
        return super().encode(req)


def test_oversized_requests_are_rejected_before_tokenisation(make_stack, redis_server):
    tok = CountingTokenizer()
    st = make_stack({"max_prompt_chars": 1000, "max_request_bytes": 4000, "redis_url": redis_server.url,
                     "tenant_limits": {"tiny": {"tokens_per_minute": 40}}}, tokenizer=tok)
    with st.client() as c:
        with pytest.raises(InvalidRequestError, match="1001 characters"):
            c.generate(prompt="x" * 1001)
        with pytest.raises(InvalidRequestError, match="bytes"):
            c.generate(messages=[{"role": "user", "content": "y" * 900}] * 5)
        with pytest.raises(InvalidRequestError, match="characters"):
            c.tokenize("z" * 1001)
    assert tok.encoded == 0
    with st.client("k-tiny") as c:
        assert len(c.tokenize("a" * 30)) == 30  # Tokenize counts against tokens per minute
        with pytest.raises(QuotaExceededError, match="tokens per minute") as ei:
            c.tokenize("a" * 30)
        assert ei.value.retry_after_s and ei.value.retry_after_s > 0
        n = tok.encoded
        with pytest.raises(QuotaExceededError, match="tokens per minute"):
            c.generate(prompt="a", max_new_tokens=20)  # 10 left < 21: refused before tokenising
        assert tok.encoded == n


# ------------------------------------------------ 5. a dead replica: UNAVAILABLE, fail fast


class ActorDiedError(Exception):
    """Named like ray.exceptions.ActorDiedError (matched by name, as the ingress does)."""


class DyingEngineHandle:
    """A deployment handle whose replica dies: after `tokens_before` tokens, or never admits."""

    def __init__(self, replica, mode):
        self.replica, self.mode, self.calls = replica, mode, 0

    def options(self, **_):
        return self

    @property
    def generate(self):
        outer = self

        class M:
            def remote(self, payload):
                outer.calls += 1
                return outer._stream(payload, outer.calls)
        return M()

    async def _stream(self, payload, call):
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "die_once" and call > 1:
            async for ev in self.replica.generate(payload):
                yield ev
            return
        yield {"tokens": [], "admitted": True, "replica": "doomed"}
        raise ActorDiedError("The actor died unexpectedly before finishing this task.")

    def __getattr__(self, name):
        return getattr(LocalHandle(self.replica), name)


def test_a_dead_replica_ends_streams_unavailable_and_the_sdk_retries(make_stack):
    st = make_stack({})
    st.ingress.engine = DyingEngineHandle(st.replica, "die")
    with st.client() as c:
        with pytest.raises(UnavailableError, match="unavailable") as ei:
            c.generate(prompt="abc", max_new_tokens=2)
        assert ei.value.retry_after_s is not None
    st.ingress.engine = h = DyingEngineHandle(st.replica, "die_once")
    with st.client(retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02, max_hint_s=2)) as c:
        assert c.generate(prompt="abc", max_new_tokens=2).text == "cb"
        assert c.attempts == 2 and h.calls == 2


def test_no_replica_admitting_fails_fast(make_stack):
    st = make_stack({"admit_timeout_s": 0.3})
    st.ingress.engine = DyingEngineHandle(st.replica, "hang")
    t0 = time.monotonic()
    with st.client(timeout=10) as c:
        with pytest.raises(UnavailableError, match="no engine replica accepted"):
            c.generate(prompt="abc", max_new_tokens=2)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------ 6. back-pressure with a retry hint the SDK honours


class GatedEngine(ScriptedEngine):
    """Admits every request but emits nothing until the gate opens."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def submit(self, req):
        inner = super().submit(req)
        gate = self.gate

        class Handle:
            async def __aiter__(self):
                while not gate.is_set():
                    await asyncio.sleep(0.01)
                async for ev in inner:
                    yield ev

            def cancel(self):
                inner.cancel()

        return Handle()


def test_a_full_tenant_queue_is_resource_exhausted_with_a_hint(make_stack):
    eng = GatedEngine()
    st = make_stack({"max_queued_per_tenant": 1, "retry_after_ms": 250}, engine=eng)
    with st.client() as c, st.client() as c2, st.client("k-zeta") as z:
        first = c.stream(prompt="abcd", max_new_tokens=2)
        t = threading.Thread(target=lambda: list(first))
        t.start()
        deadline = time.monotonic() + 5
        while not st.ingress.admission.waiting.get("acme") and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(QuotaExceededError, match="queue limit") as ei:
            c2.generate(prompt="x", max_new_tokens=2)
        assert ei.value.retry_after_s == pytest.approx(0.25)
        other = threading.Thread(target=lambda: z.generate(prompt="zz", max_new_tokens=2))
        other.start()  # another tenant's queue is its own
        time.sleep(0.1)
        eng.gate.set()
        t.join(5)
        other.join(5)
    assert st.ingress.admission.waiting == {} and st.ingress.admission.in_flight == {}


def test_serve_backpressure_is_resource_exhausted_with_a_hint(make_stack):
    class BackPressureError(Exception):
        pass

    class Full(DyingEngineHandle):
        async def _stream(self, payload, call):
            if call == 1:
                raise BackPressureError("queue full")
                yield  # pragma: no cover
            async for ev in self.replica.generate(payload):
                yield ev

    st = make_stack({"retry_after_ms": 300})
    st.ingress.engine = Full(st.replica, "")
    slept = []

    async def fake_sleep(s):
        slept.append(s)

    async def go():
        async with AsyncMedusaClient(st.target, api_key="k-acme", timeout=10, sleep=fake_sleep,
                                     retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)) as c:
            return (await c.generate(prompt="ab", max_new_tokens=2)).text, c.attempts

    assert run(go()) == ("ba", 2)
    assert slept and slept[0] >= 0.3  # the SDK waited the server's hint, not its own 10 ms backoff


def test_sdk_gives_up_on_resource_exhausted_without_a_hint_or_a_long_one():
    p = RetryPolicy(max_hint_s=5)
    assert not p.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, started=False)
    assert p.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, started=False, hint_s=1.0)
    assert not p.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, started=False, hint_s=60.0)
    assert not p.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, started=True, hint_s=1.0)
    assert p.delay(1, hint_s=2.0) == 2.0 and p.delay(1) <= p.initial_backoff_s


# ------------------------------------------------ 7. malformed bodies are INVALID_ARGUMENT


def test_malformed_bodies_are_invalid_argument(make_stack):
    st = make_stack({})
    good = pb.GenerateRequest(prompt="ab", max_new_tokens=2).SerializeToString()
    bad_utf8 = good.replace(b"ab", b"\xff\xfe")
    corrupt = b"\x1a\xff\xff\xff\xff\x0f" + b"\x00" * 3

    async def call(body):
        async with grpc.aio.insecure_channel(st.target) as ch:
            m = ch.unary_stream("/medusa.v1.Medusa/Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
            try:
                async for _ in m(body, metadata=(("authorization", "Bearer k-acme"),), timeout=5):
                    pass
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

    for body in (bad_utf8, corrupt):
        code, details = run(call(body))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "Error" not in details and "Traceback" not in details
    assert run(call(good))[0] == grpc.StatusCode.OK


# ------------------------------------------------ 8. unknown model names


def test_unknown_model_is_not_found_naming_the_served_ones(make_stack):
    st = make_stack({})
    with st.client() as c:
        with pytest.raises(MedusaClientError, match="'gpt-9' is not served here; models: char") as ei:
            c.generate(prompt="ab", model="gpt-9")
        assert ei.value.code == grpc.StatusCode.NOT_FOUND
        assert c.generate(prompt="ab", model="char", max_new_tokens=1).text == "b"


# ------------------------------------------------ 9. the documented maximum is usable


class ContextEngine(ScriptedEngine):
    """Rejects prompt + max_new_tokens > 32, as the engine does for its max_seq_len."""

    def submit(self, req):
        if len(req.prompt_ids) + req.max_new_tokens > 32:
            raise RequestError("exceeds the engine's max_seq_len of 32 tokens")
        return super().submit(req)


def test_max_new_tokens_at_the_limit_is_cut_to_the_context(make_stack):
    eng = ContextEngine()
    st = make_stack({"max_new_tokens_limit": 32, "default_max_new_tokens": 32}, engine=eng,
                    info={"id": "char", "context_length": 32})
    with st.client() as c:
        r = c.generate(prompt="abcd", max_new_tokens=32)
        assert r.finish_reason == "length" and eng.submitted[-1].max_new_tokens == 28
        assert c.generate(prompt="abcd").usage.prompt_tokens == 4  # the default (== limit) too
        with pytest.raises(InvalidRequestError, match="context holds 32"):
            c.generate(prompt="q" * 32)


# ------------------------------------------------ 10. rejections do not raise or log errors


class Ctx:
    def __init__(self, md=()):
        self.md, self.code, self.details, self.trailing = list(md), None, "", []

    def invocation_metadata(self):
        return self.md

    def set_code(self, c):
        self.code = c

    def set_details(self, d):
        self.details = d

    def set_trailing_metadata(self, md):
        self.trailing = md


def test_rejections_set_a_status_without_raising_or_logging_errors(caplog):
    assert "error" in TokenizerService(CharTokenizer()).encode({"messages": [{"role": "robot", "content": "x"}]})
    settings = Settings.parse({"api_keys": KEYS, "tenant_limits": {"none": {"max_concurrent": 0}}})
    ing = Ingress(LocalHandle(TokenizerService(CharTokenizer())), LocalHandle(EngineReplica(ScriptedEngine(), replica_id="r")),
                  settings)

    async def go(md, req):
        ctx = Ctx(md)
        out = [m async for m in ing.Generate(req, ctx)]  # no exception: Serve would log its traceback
        tok = await ing.Tokenize(pb.TokenizeRequest(text="x"), Ctx(md))
        return ctx, out, tok

    with caplog.at_level(logging.INFO):
        for md, req, code in [((), pb.GenerateRequest(prompt="a"), grpc.StatusCode.UNAUTHENTICATED),
                              ((("authorization", "Bearer nope"),), pb.GenerateRequest(prompt="a"), grpc.StatusCode.UNAUTHENTICATED),
                              ((("authorization", "Bearer k-acme"),), pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
                              ((("authorization", "Bearer k-acme"),),  # refused by the tokenizer service: returned, not raised
                               pb.GenerateRequest(chat=pb.Conversation(messages=[pb.ChatMessage(role="robot", content="x")])),
                               grpc.StatusCode.INVALID_ARGUMENT)]:
            ctx, out, tok = run(go(md, req))
            assert ctx.code == code and "Traceback" not in ctx.details
            assert [m.WhichOneof("event") for m in out] == [None]  # one empty message carries the status through Serve
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------ 11. a tenant's sessions stay within its share


class PoolEngine(ScriptedEngine):
    """Keeps the KV of at most `rows` finished sessions, least recently used evicted first
    (like medusa.decoding.kv_pool); reused = common prefix with the kept tokens."""

    def __init__(self, rows=4):
        super().__init__()
        self.rows = rows
        self.kept = collections.OrderedDict()

    def submit(self, req):
        reused = 0
        if req.session_id in self.kept:
            kept = self.kept.pop(req.session_id)
            while reused < min(len(kept), len(req.prompt_ids) - 1) and kept[reused] == req.prompt_ids[reused]:
                reused += 1
        out = list(reversed(req.prompt_ids))[: req.max_new_tokens]
        pool = self

        class Handle:
            async def __aiter__(self):
                yield Event(req.request_id, out)
                if req.session_id is not None:
                    pool.kept[req.session_id] = list(req.prompt_ids) + out
                    while len(pool.kept) > pool.rows:
                        pool.kept.popitem(last=False)
                yield Event(req.request_id, [], "length", Stats(len(req.prompt_ids), len(out), 1, 1.0, reused, 0, 0, "t"))

            def cancel(self):
                pass

        return Handle()


def test_one_tenant_cannot_evict_another_tenants_sessions():
    replica = EngineReplica(PoolEngine(rows=4), replica_id="r", session_share=2)

    async def turn(tenant, session, prompt):
        evs = [ev async for ev in replica.generate({"prompt_ids": prompt, "max_new_tokens": 2, "sampling": {},
                                                     "tenant": tenant, "session": f"{tenant}/{session}"})]
        return evs[-1]["stats"]["reused_tokens"]

    async def go():
        await turn("b", "keep", [11, 12, 13, 14])
        for i in range(10):
            await turn("a", f"s{i}", [20 + i, 21, 22])
        a_again = await turn("a", "s9", [29, 21, 22, 22, 21, 5])  # its most recent session is kept
        return await turn("b", "keep", [11, 12, 13, 14, 14, 13, 7]), a_again

    b_reused, a_reused = run(go())
    assert b_reused > 0 and a_reused > 0
    assert len(replica._slots["a"]) == 2


# ------------------------------------------------ 12. drain on shutdown


class SlowEngine(ScriptedEngine):
    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def submit(self, req):
        inner = super().submit(req)
        delay = self.delay

        class Handle:
            async def __aiter__(self):
                async for ev in inner:
                    await asyncio.sleep(delay)
                    yield ev

            def cancel(self):
                inner.cancel()

        return Handle()


@pytest.mark.parametrize("grace,finished", [(10.0, True), (0.2, False)])
def test_drain_finishes_or_cuts_in_flight_streams_and_refuses_new_ones(make_stack, grace, finished):
    eng = SlowEngine(0.1)
    st = make_stack({}, engine=eng)
    result = {}

    def stream():
        with st.client() as c:
            try:
                result["text"] = c.generate(prompt="abcdefgh", max_new_tokens=8).text
            except Exception as e:  # noqa: BLE001
                result["error"] = e

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 5
    while not st.ingress.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    drain = asyncio.run_coroutine_threadsafe(st.ingress.drain(grace), st.loop)
    time.sleep(0.05)
    with st.client() as c:
        with pytest.raises(UnavailableError, match="shutting down"):
            c.generate(prompt="new", max_new_tokens=2)
        assert c.health()[0] == "NOT_SERVING"
    out = drain.result(15)
    t.join(15)
    if finished:
        assert result.get("text") == "hgfedcba" and out == {"in_flight": 1, "finished": 1, "cancelled": 0}
    else:
        assert isinstance(result.get("error"), UnavailableError) and out["cancelled"] == 1
        assert eng.cancelled  # the engine stops computing the cut request
