"""The batched engine on a GPU: greedy rows of a 16-request batch equal their lone decodes (float32,
TF32 off, so that the comparison is exact), and plain throughput grows with the batch.
Prints the measured figures (run with -s to see them)."""
import time

import pytest
import torch

from medusa.decoding.engine import Engine, Request
from medusa.decoding.generate import generate

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tree", ["tree16", "tree16+lookup8"])
def test_batched_greedy_equals_alone_on_gpu(gpu_stack, mt_texts, tree):
    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts[:8]] * 2
    eos = tuple(s.model.cfg.eos_token_ids)
    modes = ["on", "auto", "off", "on"] * 4
    eng = Engine(s.model, s.heads, tree, max_batch=16, max_seq_len=1024)
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


def test_engine_graphs_equal_the_padded_eager_step(gpu_stack, mt_texts):
    """The captured step (CUDA graphs per batch bucket) gives the very tokens of the same padded
    step run eagerly: greedy, seeded-sampled and typical rows, mixed switches, a session's second
    turn reusing its KV while idle rows pad the batch."""
    from medusa.decoding.sampling import SamplingParams

    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts[:5]]
    sampled = {1: SamplingParams(temperature=0.8, top_k=20, rule="sample", seed=5),
               3: SamplingParams(temperature=0.7, rule="typical", seed=6)}
    modes = ["on", "auto", "off", "on", "auto"]

    def run(graphs):
        eng = Engine(s.model, s.heads, "tree16", max_batch=8, max_seq_len=1024, graphs=graphs)
        hs = [eng.submit(Request(p, max_new_tokens=40, speculation=m, session_id=f"s{i}",
                                 sampling=sampled.get(i, SamplingParams())))
              for i, (p, m) in enumerate(zip(prompts, modes))]
        first = [h.result()[0] for h in hs]
        nxt = prompts[0] + first[0] + prompts[1][-4:]
        second, st = eng.submit(Request(nxt, max_new_tokens=40, session_id="s0", speculation="on")).result()
        assert st.reused_tokens >= len(prompts[0]) + len(first[0]) - 1
        return first, second, eng.stats()

    f_graph, s_graph, stats = run(True)
    f_eager, s_eager, _ = run(False)
    assert stats["step_mode"] == "graphs" and stats["graphs_captured"] > 0
    assert f_graph == f_eager and s_graph == s_eager
    eos = tuple(s.model.cfg.eos_token_ids)
    for i in (0, 2, 4):
        assert f_graph[i] == [t for c in generate(s.model, prompts[i], max_new_tokens=40, stop_token_ids=eos) for t in c.tokens]
    print(stats)


def test_lazy_hydra_state_in_graphs_equals_eager(monkeypatch):
    """Hydra++ heads under the engine's lazy head state, with plain and speculative steps
    alternating, as CUDA graphs (the pending store captured in the plain step graph, the catch-up
    on the host before speculative steps) and eagerly: the same tokens and the same proposals.
    A tiny random model (float32): needs no weights."""
    import medusa.decoding.engine.policy as engine_mod
    from medusa.decoding.adaptive import Choice
    from medusa.decoding.tree import build_tree
    from tests.conftest import tiny_model
    from tests.unit.test_hydra import random_heads

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model()
    heads = random_heads(model, "hydra++", seed=3).cuda()
    model.cuda()
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], name="tree6")
    turn = {"n": 0}

    def alternate(batch, speculating, options, cost, margin=0.0):  # plain, plain, tree, ...
        turn["n"] += 1
        return Choice("tree6" if turn["n"] % 3 == 0 else "ar", 0.0, "test", {})

    monkeypatch.setattr(engine_mod, "choose_tree", alternate)
    g = torch.Generator().manual_seed(5)
    V = model.cfg.vocab_size
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(4, 30, (6,), generator=g)]

    def run(graphs: bool):
        turn["n"] = 0
        eng = Engine(model, heads, tree, max_batch=4, max_seq_len=128, trees={"tree6": tree}, graphs=graphs)
        hs = [eng.submit(Request(p, max_new_tokens=20 + 3 * i, stop_token_ids=(), session_id=f"s{i % 2}"))
              for i, p in enumerate(prompts)]
        outs = [h.result()[0] for h in hs]
        return outs, eng.stats()

    eager, st_e = run(False)
    graphed, st_g = run(True)
    assert graphed == eager
    assert st_g["graphs_captured"] and st_g["catch_ups"] > 0 and st_e["catch_ups"] > 0


def test_logprobs_in_step_graphs_equal_the_eager_step(gpu_stack, mt_texts):
    """With CUDA graphs, a step where some row asks for logprobs replays a graph of its own key
    (GraphKey.logprobs) and gives the eager step's values; steps where no row asks keep replaying
    the graphs without them."""
    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts[:4]]
    ks = [5, None, 0, None]

    def run(graphs):
        eng = Engine(s.model, s.heads, "tree16", max_batch=4, max_seq_len=1024, graphs=graphs)
        hs = [eng.submit(Request(p, max_new_tokens=32, speculation="on", logprobs=k)) for p, k in zip(prompts, ks)]
        out = []
        for h in hs:
            toks, lps = [], []
            for ev in h:
                toks += ev.tokens
                lps = None if ev.logprobs is None else lps + ev.logprobs
            out.append((toks, lps))
        return out, eng

    graphed, eng = run(True)
    eager, _ = run(False)
    for k, (gt, gl), (et, el) in zip(ks, graphed, eager):
        assert gt == et
        if k is None:
            assert gl is None and el is None
            continue
        for a, b in zip(gl, el):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == k
    with_lp = sum(key.logprobs for key in eng.runner.graphs if key.kind == "step")
    assert with_lp > 0
    eng.submit(Request(prompts[1] + [13], max_new_tokens=16, speculation="on")).result()  # no row asks
    assert sum(key.logprobs for key in eng.runner.graphs if key.kind == "step") == with_lp
    assert any(key.kind == "step" and not key.logprobs for key in eng.runner.graphs)
