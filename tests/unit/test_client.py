"""Client SDK against small in-process gRPC servers (no Ray, no model): retries with backoff on
UNAVAILABLE before the first token only, deadlines, typed errors, Bearer metadata, sync and
async faces sharing one implementation."""
import asyncio
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from medusa.client import (AsyncMedusaClient, AuthenticationError, DeadlineExceededError, InvalidRequestError,
                           MedusaClient, QuotaExceededError, RetryPolicy, UnavailableError)
from medusa.client.types import StreamFold, build_request
from medusa.proto.v1 import medusa_pb2 as pb
from medusa.proto.v1 import medusa_pb2_grpc as pb_grpc

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scripted(pb_grpc.MedusaServicer):
    """Generate follows a script: one behaviour per call ("ok", "unavailable", "slow",
    "fail_after_first", "invalid", "quota"); afterwards "ok"."""

    def __init__(self, script=()):
        self.script = list(script)
        self.calls = 0
        self.metadata = []
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.calls += 1
            how = self.script.pop(0) if self.script else "ok"
        md = dict(context.invocation_metadata())
        self.metadata.append(md)
        if md.get("authorization") != "Bearer k1":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        if how == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "no replica")
        if how == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0")
        if how == "quota":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens per minute exceeded")
        if how == "slow":
            time.sleep(1.0)
        yield pb.GenerateResponse(delta=pb.Delta(text="Hel", token_ids=[1, 2]))
        if how == "fail_after_first":
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica died")
        yield pb.GenerateResponse(delta=pb.Delta(text="lo", token_ids=[3]))
        yield pb.GenerateResponse(final=pb.Final(finish_reason="length", usage=pb.Usage(prompt_tokens=4, completion_tokens=3),
                                                 stats=pb.SpeculationStats(steps=2, mean_accepted=1.5, tree="t")))

    def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])


@pytest.fixture
def server():
    servers = []

    def start(script=()):
        svc = Scripted(script)
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_MedusaServicer_to_server(svc, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        srv.start()
        servers.append(srv)
        return svc, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(None)


def test_generate_and_stream_fold_deltas(server):
    svc, target = server()
    with MedusaClient(target, api_key="k1", retry=FAST) as c:
        r = c.generate("hi", max_new_tokens=3)
        assert (r.text, r.token_ids, r.finish_reason) == ("Hello", [1, 2, 3], "length")
        assert r.usage.completion_tokens == 3 and r.stats.mean_accepted == pytest.approx(1.5)
        finals = []
        assert [d.text for d in c.stream("hi", on_final=finals.append)] == ["Hel", "lo"]
        assert finals[0].finish_reason == "length" and finals[0].token_ids == [1, 2, 3]
        assert c.tokenize("ab") == [97, 98]
    assert svc.metadata[0]["authorization"] == "Bearer k1"


def test_retries_unavailable_before_the_first_token(server):
    svc, target = server(["unavailable", "unavailable"])
    with MedusaClient(target, api_key="k1", retry=FAST) as c:
        assert c.generate("hi").text == "Hello"
        assert c.attempts == 3 and svc.calls == 3


def test_no_retry_once_a_token_arrived(server):
    svc, target = server(["fail_after_first"])
    with MedusaClient(target, api_key="k1", retry=FAST) as c:
        got = []
        with pytest.raises(UnavailableError, match="replica died"):
            for d in c.stream("hi"):
                got.append(d.text)
        assert got == ["Hel"] and svc.calls == 1


def test_stopped_server_retries_then_raises_unavailable():
    target = f"127.0.0.1:{free_port()}"  # nothing listens here
    sleeps = []

    async def fake_sleep(s):
        sleeps.append(s)

    async def go():
        async with AsyncMedusaClient(target, retry=FAST, timeout=5, sleep=fake_sleep) as c:
            with pytest.raises(UnavailableError):
                await c.generate("hi")
            return c.attempts

    assert asyncio.run(go()) == 3
    assert len(sleeps) == 2 and all(0.005 <= s <= 0.02 for s in sleeps)


def test_deadline_bounds_retries_against_a_stopped_server():
    target = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.1)
    t0 = time.monotonic()
    with MedusaClient(target, retry=policy, timeout=0.4) as c:
        with pytest.raises(DeadlineExceededError):
            c.generate("hi")
        assert 1 < c.attempts < 100
    assert time.monotonic() - t0 < 2.0


def test_deadline_on_a_slow_server(server):
    _, target = server(["slow"])
    t0 = time.monotonic()
    with MedusaClient(target, api_key="k1", retry=FAST) as c:
        with pytest.raises(DeadlineExceededError):
            c.generate("hi", timeout=0.3)
    assert time.monotonic() - t0 < 0.9


@pytest.mark.parametrize("how,exc,reason", [("invalid", InvalidRequestError, "temperature"),
                                            ("quota", QuotaExceededError, "tokens per minute")])
def test_typed_errors_carry_the_reason(server, how, exc, reason):
    svc, target = server([how])
    with MedusaClient(target, api_key="k1", retry=FAST) as c:
        with pytest.raises(exc, match=reason) as ei:
            c.generate("hi")
        assert ei.value.code == exc.code and svc.calls == 1


def test_missing_key_is_an_authentication_error(server):
    _, target = server()
    with MedusaClient(target, retry=FAST) as c:
        with pytest.raises(AuthenticationError):
            c.generate("hi")


def test_async_stream_stops_early_and_cancels(server):
    _, target = server()

    async def go():
        async with AsyncMedusaClient(target, api_key="k1") as c:
            async for d in c.stream(messages=[{"role": "user", "content": "x"}]):
                return d.text

    assert asyncio.run(go()) == "Hel"


def test_build_request_and_fold():
    req = build_request(messages=[{"role": "user", "content": "hi"}], session_id="s", seed=3, stop=["\n"], speculation="off")
    assert req.WhichOneof("input") == "chat" and req.sampling.HasField("seed") and req.speculation == pb.SPECULATION_OFF
    assert not build_request("x").sampling.HasField("seed")
    for bad in (dict(), dict(prompt="a", messages=[]), dict(prompt="a", speculation="maybe")):
        with pytest.raises(ValueError):
            build_request(**bad)
    f = StreamFold()
    assert not f.started
    f.push(pb.GenerateResponse(delta=pb.Delta(text="a", token_ids=[5])))
    assert f.started and f.final is None
    f.push(pb.GenerateResponse(final=pb.Final(finish_reason="eos")))
    assert f.final.text == "a" and f.final.token_ids == [5]


def test_backoff_grows_and_is_capped():
    import random

    p = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2)
    rng = random.Random(0)
    caps = [0.1, 0.2, 0.3, 0.3]
    for attempt, cap in enumerate(caps, 1):
        assert 0.5 * cap <= p.backoff(attempt, rng) <= cap
    assert p.should_retry(grpc.StatusCode.UNAVAILABLE, 1, started=False)
    assert not p.should_retry(grpc.StatusCode.UNAVAILABLE, 1, started=True)
    assert not p.should_retry(grpc.StatusCode.INTERNAL, 1, started=False)
    assert not p.should_retry(grpc.StatusCode.UNAVAILABLE, p.max_attempts, started=False)


def test_client_does_not_import_torch():
    code = "import sys, medusa.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _self_signed(tmp_path):
    import datetime

    crypto = pytest.importorskip("cryptography")  # noqa: F841
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def test_tls_channel(tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_MedusaServicer_to_server(Scripted(), srv)
    port = srv.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key, cert)]))
    srv.start()
    try:
        with MedusaClient(f"localhost:{port}", api_key="k1", root_certificates=cert, retry=FAST) as c:
            assert c.generate("hi").text == "Hello"
        with MedusaClient(f"localhost:{port}", api_key="k1", retry=FAST, timeout=2) as c:  # plaintext to a TLS port
            with pytest.raises((UnavailableError, DeadlineExceededError)):
                c.generate("hi")
    finally:
        srv.stop(None)


def test_logprobs_request_and_fold():
    """logprobs=k asks for each token's logprob and k alternatives; the fold keeps them in order."""
    req = build_request("x", logprobs=2)
    assert req.logprobs and req.top_logprobs == 2
    assert not build_request("x").logprobs
    f = StreamFold(asked=True)
    lp = pb.TokenLogprob(token_id=5, token="a", logprob=-0.5, text_offset=0,
                         top_logprobs=[pb.TokenLogprob(token_id=5, token="a", logprob=-0.5),
                                       pb.TokenLogprob(token_id=6, token="b", logprob=-1.5)])
    d = f.push(pb.GenerateResponse(delta=pb.Delta(text="a", token_ids=[5], logprobs=[lp])))
    assert [(e.token, e.logprob, [t.token for t in e.top]) for e in d.logprobs] == [("a", -0.5, ["a", "b"])]
    f.push(pb.GenerateResponse(final=pb.Final(finish_reason="eos")))
    assert [e.token_id for e in f.final.logprobs] == [5]
    g = StreamFold()
    g.push(pb.GenerateResponse(final=pb.Final(finish_reason="eos")))
    assert g.final.logprobs is None
