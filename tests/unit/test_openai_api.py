"""The OpenAI-compatible HTTP face, grpc.health.v1 and stop strings on text, without Ray: the
plain Ingress (scripted engine, character tokenizer, a private redis-server) behind a real
uvicorn server and a grpc.aio server, driven by the real `openai` client and the standard
health stub. The real model through a live `medusa serve` is in tests/integration/test_openai_serving.py."""
import asyncio
import json
import threading
import urllib.error
import urllib.request

import grpc
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("redis")
pytest.importorskip("uvicorn")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from test_services import CharTokenizer, ScriptedEngine  # noqa: E402  (the stand-ins of the gRPC path's tests)

from services import telemetry  # noqa: E402
from services.config import Settings  # noqa: E402
from services.engine_replica import EngineReplica  # noqa: E402
from services.ingress import Ingress  # noqa: E402
from services.local import LocalHandle, start_http, start_server  # noqa: E402
from services.redis_local import start_redis  # noqa: E402
from services.stops import StopMatcher  # noqa: E402
from services.tokenizer_service import TokenizerService  # noqa: E402


def T(text):  # what the scripted engine answers to a chat turn: the templated prompt reversed
    return ("<user>" + text + "<assistant>")[::-1]


class ActorDiedError(Exception):
    """Named as Ray's: what a call to a killed engine replica raises (matched by name)."""


class BrokenEngine:
    """Health fails; generate raises what Serve raises when the engine's queue is full, or
    (dead = True) what a call to a dead replica raises."""

    dead = False

    async def health(self):
        raise RuntimeError("engine down")

    async def generate(self, payload):
        from ray.serve.exceptions import BackPressureError

        if self.dead:
            raise ActorDiedError("the actor died unexpectedly")
        raise BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=2.5)
        yield  # an async generator, like EngineReplica.generate

    async def info(self):
        return {"id": "char"}


@pytest.fixture(scope="module")
def face():
    r = start_redis()
    settings = Settings.parse({
        "redis_url": r.url, "tracing": "memory", "default_max_new_tokens": 6, "max_new_tokens_limit": 64,
        "model_id": "char", "max_request_bytes": 20000, "max_prompt_chars": 1000,
        "api_keys": [{"tenant": "acme", "key": "k-acme"}, {"tenant": "tiny", "key": "k-tiny"}, {"tenant": "noq", "key": "k-noq"}],
        "tenant_limits": {"tiny": {"tokens_per_minute": 30}, "noq": {"max_queued": 0}},
    })
    engine = ScriptedEngine()
    tok = TokenizerService(CharTokenizer(), tracing="memory")
    replica = EngineReplica(engine, replica_id="replica-1", eos=(3,), info={"id": "char", "heads": "medusa"}, tracing="memory")
    ingress = Ingress(LocalHandle(tok), LocalHandle(replica), settings)
    broken_engine = BrokenEngine()
    broken = Ingress(LocalHandle(tok), LocalHandle(broken_engine), Settings.parse({"require_auth": False, "retry_after_ms": 2500}))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    http, port = on_loop(start_http(ingress))
    http_broken, port_broken = on_loop(start_http(broken))
    grpc_server, grpc_port = on_loop(start_server(ingress))
    yield {"url": f"http://127.0.0.1:{port}/v1", "broken": f"http://127.0.0.1:{port_broken}", "engine": engine,
           "grpc": f"127.0.0.1:{grpc_port}", "broken_engine": broken_engine, "broken_ingress": broken,
           "on_loop": on_loop}
    for s in (http, http_broken):
        s.should_exit = True
    on_loop(grpc_server.stop(None))
    on_loop(asyncio.sleep(0.3))
    loop.call_soon_threadsafe(loop.stop)
    r.stop()


def client(face, key="k-acme"):
    return openai.OpenAI(base_url=face["url"], api_key=key, max_retries=0, timeout=10)


def test_chat_completion_streamed_and_not(face):
    c = client(face)
    msgs = [{"role": "user", "content": "abcd"}]
    r = c.chat.completions.create(model="char", messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == T("abcd")[:5] and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion" and r.model == "char"
    assert r.usage.prompt_tokens == len(T("abcd")) and r.usage.completion_tokens == 5
    assert r.model_extra["medusa"]["mean_accepted"] == 2.0 and r.model_extra["medusa"]["replica_id"] == "replica-1"
    chunks = list(c.chat.completions.create(model="char", messages=msgs, max_completion_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and len({ch.id for ch in chunks}) == 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    req = face["engine"].submitted[-1]
    assert req.sampling.greedy and req.max_new_tokens == 5


def test_completions_models_and_session_header(face):
    c = client(face)
    r = c.completions.create(model="char", prompt="hello", max_tokens=4, temperature=0, extra_body={"speculation": "off"})
    assert r.choices[0].text == "olle" and r.object == "text_completion"
    assert face["engine"].submitted[-1].speculation == "off"
    assert "".join(x.choices[0].text for x in c.completions.create(model="char", prompt="hello", max_tokens=4, stream=True)) == "olle"
    assert [m.id for m in c.models.list()] == ["char"]
    slots = []
    for sid in ("conv-9", "conv-10", "conv-9"):  # the replica maps a tenant's sessions to its own slots
        c.chat.completions.create(model="char", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  extra_headers={"X-Session-Id": sid})
        slots.append(face["engine"].submitted[-1].session_id)
    assert all(s.startswith("acme/") for s in slots) and slots[0] == slots[2] != slots[1]


def test_errors_have_openais_shape_and_status(face):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        client(face, "wrong").chat.completions.create(model="char", messages=msgs)
    assert e.value.status_code == 401 and e.value.body["message"] == "unknown API key"
    with pytest.raises(openai.NotFoundError) as e:
        client(face).chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    for kwargs, param in (({"n": 2}, "n"), ({"temperature": 3}, "temperature"), ({"top_logprobs": 2}, "top_logprobs"),
                          ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
                          ({"max_tokens": 1000}, None)):
        with pytest.raises(openai.BadRequestError) as e:
            client(face).chat.completions.create(model="char", messages=msgs, **kwargs)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError):
        client(face).chat.completions.create(model="char", messages=[])
    with pytest.raises(openai.RateLimitError) as e:  # tenant "tiny" may spend 30 tokens a minute
        client(face, "k-tiny").chat.completions.create(model="char", messages=[{"role": "user", "content": "x" * 40}])
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["type"] == "rate_limit_error"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(face["broken"] + "/health", timeout=10)
    assert e.value.code == 503 and json.loads(e.value.read())["details"]["engine"].startswith("unavailable")
    busy = openai.OpenAI(base_url=face["broken"] + "/v1", api_key="-", max_retries=0, timeout=10)
    with pytest.raises(openai.RateLimitError) as e:  # the engines' bounded queues are full: 429, retry hint in s
        busy.chat.completions.create(model="char", messages=msgs)
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "3"
    assert e.value.body["type"] == "rate_limit_error"
    face["broken_engine"].dead = True
    try:
        with pytest.raises(openai.InternalServerError) as e:  # a dead replica: 503, safe to retry
            busy.chat.completions.create(model="char", messages=msgs)
    finally:
        face["broken_engine"].dead = False
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "3"
    assert e.value.body["type"] == "service_unavailable"
    ok = json.loads(urllib.request.urlopen(face["url"][:-3] + "/health", timeout=10).read())
    assert ok["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(face["url"] + "/nothing", timeout=10)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


def test_stop_strings_match_text_across_chunks_and_are_trimmed(face):
    c = client(face)
    before = len(face["engine"].cancelled)
    # The engine answers "zyx" + 40 "m" two characters per event: "yx" spans two events.
    r = c.completions.create(model="char", prompt="m" * 40 + "xyz", max_tokens=43, stop=["yx", "q"], temperature=0)
    assert r.choices[0].text == "z" and r.choices[0].finish_reason == "stop"
    assert len(face["engine"].cancelled) == before + 1  # the engine request was cancelled at the match
    chunks = list(c.completions.create(model="char", prompt="abcxyz", max_tokens=6, stop="cb", stream=True))
    assert "".join(x.choices[0].text for x in chunks) == "zyx"
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = c.completions.create(model="char", prompt="abcxyz", max_tokens=6, stop=["ab"], temperature=0)  # "ba" is no match
    assert r.choices[0].text == "zyxcba" and r.choices[0].finish_reason == "length"


def _scripted(out: str, k: int):
    """What ScriptedEngine's made-up logprobs are for output text `out` (CharTokenizer: one
    character a token): [(token, logprob, [(alternative, logprob)])]."""
    return [(ch, -(j + 1) / 8, [(chr(ord(ch) + m), -(j + 1) / 8 - m) for m in range(k)]) for j, ch in enumerate(out)]


def test_chat_logprobs_streamed_and_not(face):
    c = client(face)
    msgs = [{"role": "user", "content": "abcd"}]
    r = c.chat.completions.create(model="char", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    text = r.choices[0].message.content
    want = _scripted(text, 2)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == list(text)
    for e, (tok, lp, top) in zip(content, want):
        assert e.logprob == pytest.approx(lp) and e.bytes == list(tok.encode())
        assert [(t.token, t.bytes) for t in e.top_logprobs] == [(t, list(t.encode())) for t, _ in top]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx([v for _, v in top])
    assert face["engine"].submitted[-1].logprobs == 2
    chunks = list(c.chat.completions.create(model="char", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                            stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.top_logprobs) for e in streamed] == [(ch, []) for ch in text]
    assert [e.logprob for e in streamed] == pytest.approx([lp for _, lp, _ in want])
    plain = c.chat.completions.create(model="char", messages=msgs, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and face["engine"].submitted[-1].logprobs is None


def test_completions_logprobs_and_stop_trimming(face):
    c = client(face)
    r = c.completions.create(model="char", prompt="hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    want = _scripted("olle", 3)
    assert lp.tokens == list("olle") and lp.text_offset == [0, 1, 2, 3]
    assert lp.token_logprobs == pytest.approx([v for _, v, _ in want])
    assert lp.top_logprobs == [dict(top) for _, _, top in want]
    chunks = list(c.completions.create(model="char", prompt="hello", max_tokens=4, logprobs=1, stream=True))
    assert [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == list("olle")
    # the stop string "yx" trims "yx..." from the text: the logprobs of the trimmed tokens go too,
    # although "y" arrived in the same engine event as "z" and was held back as a possible beginning
    r = c.completions.create(model="char", prompt="m" * 40 + "xyz", max_tokens=43, stop=["yx", "q"], temperature=0, logprobs=0)
    assert r.choices[0].text == "z" and r.choices[0].logprobs.tokens == ["z"]
    chunks = list(c.completions.create(model="char", prompt="abcxyz", max_tokens=6, stop="cb", stream=True, logprobs=0))
    assert [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == list("zyx")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="char", prompt="hello", max_tokens=4, logprobs=6)
    assert e.value.body["param"] == "logprobs" and "0-5" in e.value.body["message"]


def test_top_logprobs_over_the_cap_is_a_400_naming_it(face):
    with pytest.raises(openai.BadRequestError) as e:
        client(face).chat.completions.create(model="char", messages=[{"role": "user", "content": "hi"}],
                                             logprobs=True, top_logprobs=6)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_logprobs"
    assert "at most 5" in e.value.body["message"]


def test_stop_matcher_holds_back_only_possible_beginnings():
    m = StopMatcher(["</end>", "STOP"])
    assert m.push("hello <") == ("hello ", False)  # "<" may begin "</end>"
    assert m.push("b>") == ("<b>", False)  # it did not
    assert m.push("ST") == ("", False)
    assert m.push("OPPED") == ("", True) and m.matched == "STOP"
    m = StopMatcher(["ab"])
    assert m.push("xa") == ("x", False) and m.flush() == "a"
    assert StopMatcher([]).push("abc") == ("abc", False)


def test_grpc_health_v1_check(face):
    with grpc.insecure_channel(face["grpc"]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "medusa.v1.Medusa"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        first = next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_server_spans_carry_http_and_genai_attributes(face):
    client(face).chat.completions.create(model="char", messages=[{"role": "user", "content": "spans"}], max_tokens=3,
                                         temperature=0, extra_headers={"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    spans = [s for s in telemetry._memory.get_finished_spans() if s.name == "ingress.Generate"
             and s.context.trace_id == int("ab" * 16, 16)]
    assert len(spans) == 1
    s = spans[0]
    a = dict(s.attributes)
    assert s.kind.name == "SERVER" and a["http.request.method"] == "POST" and a["http.route"] == "/v1/chat/completions"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "char"
    assert a["gen_ai.usage.input_tokens"] == len(T("spans")) and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["gen_ai.request.max_tokens"] == 3
    grpc_spans = [x for x in telemetry._memory.get_finished_spans() if x.name == "ingress.Generate" and "rpc.system" in x.attributes]
    assert all(x.kind.name == "SERVER" and x.attributes["rpc.method"] == "Generate" for x in grpc_spans)


def test_http_face_has_the_grpc_paths_protections(face):
    """Issue 26 through the HTTP face: the body's bytes are refused before parsing (413), the
    prompt's characters before tokenisation (400), a tenant's full admission queue is 429 with
    Retry-After, and a draining server is 503; nothing reaches the engine."""
    before = len(face["engine"].submitted)
    req = urllib.request.Request(face["url"] + "/completions", data=json.dumps({"prompt": "x" * 30000}).encode(),
                                 headers={"Authorization": "Bearer k-acme", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        client(face).completions.create(model="char", prompt="x" * 1500, max_tokens=2)
    assert "1500 characters" in e.value.body["message"]
    with pytest.raises(openai.RateLimitError) as e:  # tenant "noq" may queue nothing
        client(face, "k-noq").completions.create(model="char", prompt="hi", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1 and "queue" in e.value.body["message"]
    assert len(face["engine"].submitted) == before
    broken = face["broken_ingress"]
    face["on_loop"](broken.admission.drain(0))
    try:
        busy = openai.OpenAI(base_url=face["broken"] + "/v1", api_key="-", max_retries=0, timeout=10)
        with pytest.raises(openai.InternalServerError) as e:
            busy.completions.create(model="char", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and "shutting down" in e.value.body["message"]
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        broken.admission.draining = False


def test_beam_search_extension_returns_n_beams_and_refuses_what_it_cannot_do(face):
    c = client(face)
    r = c.completions.create(model="char", prompt="abcd", max_tokens=3, n=2,
                             extra_body={"beams": 3, "length_penalty": 0.5, "early_stopping": "never"})
    assert [ch.text for ch in r.choices] == ["dcb", "cb"] and [ch.index for ch in r.choices] == [0, 1]
    assert r.model_extra["medusa"]["beam_scores"] == [-1.0, -2.0]
    req = face["engine"].submitted[-1]
    assert (req.beams, req.num_return, req.length_penalty, req.early_stopping) == (3, 2, 0.5, "never")
    assert req.sampling.greedy  # an unset temperature is greedy with beams (OpenAI's default is 1)
    chat = c.chat.completions.create(model="char", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     extra_body={"beams": 2, "early_stopping": True})
    assert len(chat.choices) == 1 and chat.choices[0].message.content
    assert face["engine"].submitted[-1].early_stopping is True
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs, param in (({"stream": True}, "stream"), ({"temperature": 0.7}, "temperature"),
                          ({"n": 3}, "n"), ({"logprobs": True}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="char", messages=msgs, extra_body={"beams": 2}, **kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
        assert e.value.body["type"] == "invalid_request_error"
    for extra, param in (({"length_penalty": 2.0}, "length_penalty"), ({"beams": 0}, "beams"),
                         ({"beams": 2, "early_stopping": "sometimes"}, "early_stopping")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="char", messages=msgs, extra_body=extra)
        assert e.value.body["param"].split(".")[0] == param, e.value.body  # pydantic names a union's branch
