"""The batched engine on a GPU: greedy rows of a 16-request batch equal their lone decodes (float32,
TF32 off, so that the comparison is exact), and plain throughput grows with the batch.
Prints the measured figures (run with -s to see them)."""
import time

import pytest
import torch

from medusa.decoding.engine import Engine, Request
from medusa.decoding.generate import generate

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_stack():
    from medusa.runtime import load_stack

    torch.backends.cuda.matmul.allow_tf32 = False
    return load_stack(None, heads="default", dtype="float32", device="cuda", progress=False)


def test_batched_greedy_equals_alone_on_gpu(gpu_stack, mt_texts):
    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts[:8]] * 2
    eos = tuple(s.model.cfg.eos_token_ids)
    modes = ["on", "auto", "off", "on"] * 4
    eng = Engine(s.model, s.heads, "tree16", max_batch=16, max_seq_len=1024)
    hs = [eng.submit(Request(p, max_new_tokens=48, speculation=m)) for p, m in zip(prompts, modes)]
    for p, h in zip(prompts, hs):
        out, st = h.result()
        ref = [t for c in generate(s.model, p, max_new_tokens=48, stop_token_ids=eos) for t in c.tokens]
        assert out == ref
    print(eng.stats())


def test_plain_throughput_grows_with_batch(gpu_stack, mt_texts):
    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts]
    rates = {}
    for conc in (1, 16, 64):
        eng = Engine(s.model, None, max_batch=conc, max_seq_len=1024)
        reqs = [Request(prompts[i % len(prompts)], max_new_tokens=64, stop_token_ids=()) for i in range(max(conc, 4))]
        eng.submit(Request(prompts[0], max_new_tokens=8)).result()  # warm-up
        t0 = time.perf_counter()
        hs = [eng.submit(r) for r in reqs]
        total = sum(h.result()[1].new_tokens for h in hs)
        torch.cuda.synchronize()
        rates[conc] = total / (time.perf_counter() - t0)
    print({k: round(v, 1) for k, v in rates.items()})
    assert rates[64] > 4 * rates[1]
