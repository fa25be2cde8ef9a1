"""A tensor-parallel engine replica served for real: Ray Serve on 2 CPUs, one Engine replica with
`tensor_parallel_size: 3` (a placement group of 3 CPU bundles: the replica is rank 0, two worker
actors the others, gloo between them), a private redis-server and the client SDK. It streams
the greedy tokens of the engine that `medusa generate` runs; a killed worker makes the replica
unhealthy, Serve replaces it, and the next request succeeds on the replacement."""
import os
import shutil
import signal
import time

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("ray")
pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed", allow_module_level=True)

from medusa.client import MedusaClient, RetryPolicy  # noqa: E402
from services import launch  # noqa: E402
from services.redis_local import free_port, start_redis  # noqa: E402

MAX_NEW = 16
KEY = "k-tp"


@pytest.fixture(scope="module")
def cluster():
    r = start_redis()
    args = {
        "engine_replicas": 1, "tensor_parallel_size": 3, "engine_num_cpus": 0.5, "torch_threads": 1, "max_batch": 4,
        "max_seq_len": 512, "device": "cpu", "default_max_new_tokens": MAX_NEW, "max_new_tokens_limit": 64,
        "api_keys": [{"tenant": "acme", "key": KEY}],
    }
    c = launch.start(args, grpc_port=free_port(), redis_url=r.url, num_cpus=2, env_keys="")
    try:
        yield c.target
    finally:
        c.stop()
        r.stop()


def client(target):
    return MedusaClient(target, api_key=KEY, timeout=180, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.5))


@pytest.fixture(scope="module")
def reference(stack):
    """The engine `medusa generate` runs (conftest's `stack`: the default model and heads,
    float32 on CPU), driven in this process: greedy tokens of one chat turn."""
    from medusa.decoding.engine import Engine, Request

    engine = Engine(stack.model, stack.heads, stack.tree, max_batch=1, max_seq_len=512)
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
    return lambda msgs: engine.submit(Request(stack.tokenizer.encode_chat(msgs), max_new_tokens=MAX_NEW,
                                              stop_token_ids=eos)).result()[0]


def _workers(replica_id: str = "") -> list:
    """The worker actors (ranks 1, 2) of the replica `replica_id` (all replicas: '')."""
    import ray

    from services.tensor_parallel import NAME_PREFIX

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(NAME_PREFIX + replica_id)]


def test_tp3_replica_streams_the_engines_greedy_tokens(cluster, reference):
    with client(cluster) as c:
        status, details = c.health()
        assert status == "SERVING", details
        for p in ["Name three colours.", "What is 2 + 2?"]:
            msgs = [{"role": "user", "content": p}]
            finals = []
            deltas = list(c.stream(messages=msgs, max_new_tokens=MAX_NEW, on_final=finals.append))
            assert [t for d in deltas for t in d.token_ids] == reference(msgs)
        assert len(_workers(finals[-1].replica_id)) == 2  # its ranks 1 and 2


def test_a_killed_worker_fails_the_replica_and_its_replacement_serves(cluster, reference):
    msgs = [{"role": "user", "content": "Name a planet."}]
    with client(cluster) as c:
        first = c.generate(messages=msgs, max_new_tokens=MAX_NEW)
        import ray

        victim = _workers(first.replica_id)[0]  # rank 1 of the serving replica
        os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
        deadline = time.monotonic() + 300  # health check (10 s period), then 3 ranks load the model again
        while True:
            try:
                second = c.generate(messages=msgs, max_new_tokens=MAX_NEW)
                if second.replica_id != first.replica_id:
                    break
            except Exception:  # noqa: BLE001  (UNAVAILABLE / a failed stream while the replica is replaced)
                pass
            if time.monotonic() > deadline:
                raise AssertionError("no replacement replica served within 300 s")
            time.sleep(2)
    assert second.token_ids == reference(msgs) == first.token_ids
    assert len(_workers(second.replica_id)) == 2  # the replacement's own ranks 1 and 2
