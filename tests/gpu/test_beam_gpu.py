"""Beam search on a GPU (the default model, float32, TF32 off, CUDA graphs): speculative beam
search equals plain beam search, a beam request mixed with plain requests equals it alone, and
K = 4 throughput plain against speculative. Prints the measured figures (run with -s)."""
import time

import pytest

from medusa.decoding.engine import Engine, Request

pytestmark = pytest.mark.gpu


def beams_of(engine, ids, n, K=4, speculation="on"):
    last = list(engine.submit(Request(ids, max_new_tokens=n, beams=K, num_return=K, speculation=speculation)))[-1]
    return [list(h.tokens) for h in last.beams], [h.score for h in last.beams], last.stats


def test_speculative_beams_equal_plain_beams_on_gpu(gpu_stack, mt_texts):
    s = gpu_stack
    eng = Engine(s.model, s.heads, "tree16", max_batch=8, max_seq_len=1024)
    eng.warmup(max_kv_len=1024)
    plain_s = spec_s = 0.0
    plain_n = spec_n = 0
    for text in mt_texts[:6]:
        ids = s.tokenizer.encode_prompt(text)
        t0 = time.perf_counter()
        want, want_scores, _ = beams_of(eng, ids, 64, speculation="off")
        plain_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        got, scores, st = beams_of(eng, ids, 64)
        spec_s += time.perf_counter() - t0
        plain_n += len(want[0])
        spec_n += len(got[0])
        assert got == want
        assert scores == pytest.approx(want_scores, rel=1e-4, abs=1e-4)
        print(f"beam steps per verification {st.mean_accepted:.2f}")
    print(f"K=4 best-beam tokens/s: plain {plain_n / plain_s:.1f}, speculative {spec_n / spec_s:.1f}")


def test_beam_request_mixed_with_plain_requests_on_gpu(gpu_stack, mt_texts):
    s = gpu_stack
    eng = Engine(s.model, s.heads, "tree16", max_batch=16, max_seq_len=1024)
    ids = [s.tokenizer.encode_prompt(t) for t in mt_texts[:6]]
    alone = beams_of(eng, ids[0], 48)[0]
    plain = [eng.submit(Request(p, max_new_tokens=32)).result()[0] for p in ids[1:]]
    hs = [eng.submit(Request(p, max_new_tokens=32)) for p in ids[1:3]]
    beam = eng.submit(Request(ids[0], max_new_tokens=48, beams=4, num_return=4, speculation="on"))
    hs += [eng.submit(Request(p, max_new_tokens=32)) for p in ids[3:]]
    assert [h.result()[0] for h in hs] == plain
    assert [list(h.tokens) for h in list(beam)[-1].beams] == alone
