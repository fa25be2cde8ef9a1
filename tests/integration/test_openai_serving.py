"""A live local `medusa serve` (its own Ray, its own redis-server on a free port) driven as a
user would: the real `openai` client on the HTTP API, streaming and not (greedy text equal to
`medusa generate`'s), the standard grpc.health.v1 probe on the gRPC port, and a Prometheus scrape
of the metrics port showing the vLLM-equivalent series. One server for the whole module."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("ray")
openai = pytest.importorskip("openai")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from services.redis_local import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 12
KEY = "k-acme"
PROMPTS = ["Name three colours.", "What is 2 + 2?"]


def _env():
    env = dict(os.environ, MEDUSA_API_KEYS=f"acme:{KEY}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def server():
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    cmd = [sys.executable, "-m", "medusa.cli", "serve", "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
           "--metrics-port", str(ports["metrics"]), "--num-cpus", "2", "--max-batch", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    seen = []
    deadline = time.monotonic() + 400
    try:
        for line in proc.stdout:
            seen.append(line)
            if "OpenAI-compatible API at" in line:
                break
            assert time.monotonic() < deadline, "medusa serve did not start:\n" + "".join(seen[-30:])
        else:
            pytest.fail("medusa serve exited:\n" + "".join(seen[-30:]))
        yield dict(ports, base_url=f"http://127.0.0.1:{ports['http']}/v1", log=seen)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """`medusa generate --json` (greedy, one process for all prompts): the reference texts."""
    f = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    res = subprocess.run([sys.executable, "-m", "medusa.cli", "generate", "--prompt-file", str(f), "--json",
                          "--max-new-tokens", str(MAX_NEW)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {PROMPTS[int(r["id"])]: r["text"] for r in rows}


def test_openai_client_streams_the_greedy_text_of_medusa_generate(server, generated):
    c = openai.OpenAI(base_url=server["base_url"], api_key=KEY, max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        stream = c.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_NEW, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text.strip() == generated[p].strip()
        assert chunks[-1].usage.completion_tokens <= MAX_NEW
        r = c.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_NEW, temperature=0)
        assert r.choices[0].message.content.strip() == generated[p].strip()
        assert r.model_extra["medusa"]["steps"] >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base_url"], api_key="nope", max_retries=0).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])


def test_openai_client_gets_logprobs_streamed_and_not(server):
    """The real model's logprobs in OpenAI's shapes: greedy tokens lead their top alternatives,
    the per-token texts spell the reply, streaming gives the same entries; over 5 is a 400."""
    c = openai.OpenAI(base_url=server["base_url"], api_key=KEY, max_retries=0, timeout=120)
    model = c.models.list().data[0].id
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_NEW, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        vals = [t.logprob for t in e.top_logprobs]
        assert len(vals) == 3 and vals == sorted(vals, reverse=True) and e.top_logprobs[0].token == e.token
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
    chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_NEW, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    t = c.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    lp = t.choices[0].logprobs
    assert "".join(lp.tokens) == t.choices[0].text and len(lp.top_logprobs) == len(lp.tokens)
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(len(lp.tokens))]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=msgs, max_tokens=2, logprobs=True, top_logprobs=6)


def test_grpc_health_probe(server):
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc']}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_prometheus_scrape_shows_the_vllm_equivalent_series(server):
    c = openai.OpenAI(base_url=server["base_url"], api_key=KEY, max_retries=0, timeout=120)
    # speculation "on": the spec_decode counters exist once a request ran speculative steps
    c.completions.create(model=c.models.list().data[0].id, prompt="Hello", max_tokens=8, temperature=0,
                         extra_body={"speculation": "on"})
    want = {"ray_medusa_prompt_tokens_total", "ray_medusa_generation_tokens_total", "ray_medusa_e2e_request_latency_seconds_bucket",
            "ray_medusa_engine_time_to_first_token_seconds_bucket", "ray_medusa_num_requests_running",
            "ray_medusa_num_requests_waiting", "ray_medusa_kv_cache_usage_perc", "ray_medusa_request_success_total",
            "ray_medusa_spec_decode_num_drafts_total", "ray_medusa_spec_decode_num_draft_tokens_total",
            "ray_medusa_request_queue_time_seconds_bucket", "ray_medusa_spec_decode_num_accepted_tokens_per_pos_total"}
    deadline = time.monotonic() + 90  # pushed to the node's exporter every few seconds
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=5).read().decode()
        except OSError:
            body = ""
        names = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line.startswith("ray_medusa_")}
        if want <= names:
            break
        assert time.monotonic() < deadline, f"missing metrics: {sorted(want - names)}"
        time.sleep(2)
