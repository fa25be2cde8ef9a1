"""Dynamic trees on a GPU (float32, TF32 off, so that comparisons are exact): the step grown and
verified inside a captured CUDA graph gives the tokens of the same step run eagerly, greedy rows
equal plain greedy decoding, and the accept kernel reads per-row trees as its torch path does.
Prints the step cost of dynamic against static trees (run with -s): not a timing assertion."""
import pytest
import torch

from medusa.decoding.engine import Engine, Request
from medusa.decoding.generate import generate
from medusa.decoding.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tree", ["dynamic64", "dynamic32@0.02+lookup16"])
def test_graphed_dynamic_step_equals_eager(gpu_stack, mt_texts, tree):
    """Greedy, seeded-sampled and typical rows with mixed switches, as CUDA graphs per batch
    bucket and eagerly: the same tokens; greedy rows equal plain greedy decoding."""
    s = gpu_stack
    prompts = [s.tokenizer.encode_prompt(t) for t in mt_texts[:6]]
    sampled = {1: SamplingParams(temperature=0.8, top_k=20, rule="sample", seed=5),
               3: SamplingParams(temperature=0.7, rule="typical", seed=6)}
    modes = ["on", "on", "off", "on", "auto", "on"]

    def run(graphs):
        eng = Engine(s.model, s.heads, tree, max_batch=8, max_seq_len=1024, graphs=graphs)
        hs = [eng.submit(Request(p, max_new_tokens=48, speculation=m, sampling=sampled.get(i, SamplingParams())))
              for i, (p, m) in enumerate(zip(prompts, modes))]
        return [h.result() for h in hs], eng.stats()

    graphed, stats = run(True)
    eager, _ = run(False)
    assert stats["step_mode"] == "graphs" and stats["graphs_captured"] > 0
    assert [o for o, _ in graphed] == [o for o, _ in eager]
    eos = tuple(s.model.cfg.eos_token_ids)
    for i in (0, 2, 5):
        ref = [t for c in generate(s.model, prompts[i], max_new_tokens=48, stop_token_ids=eos) for t in c.tokens]
        assert graphed[i][0] == ref
    assert max(st.mean_accepted for i, (_, st) in enumerate(graphed) if modes[i] == "on") > 1.0
    print(tree, stats["acceptance"], stats["steps_by_tree"])


def test_accept_kernel_reads_per_row_trees():
    """medusa.kernels.accept with a parent and retrieve table per row equals verify's torch path."""
    pytest.importorskip("triton")
    from medusa.decoding import verify as V
    from medusa.decoding.dynamic_tree import grow
    from medusa.decoding.sampling import BatchSampling
    from medusa.kernels import accept

    g = torch.Generator(device="cuda").manual_seed(0)
    B, V_ = 32, 4

    def children(level, chains):
        lp = torch.randn(*chains.shape[:2], V_, device="cuda", generator=g).log_softmax(-1)
        top = lp.topk(3, dim=-1)
        return top.indices, top.values

    rows = grow(children, torch.randint(0, V_, (B,), device="cuda", generator=g), nodes=64, depth=4, topk=3,
                threshold=0.01)
    sampling = BatchSampling.stack([SamplingParams()] * B, "cuda")
    for cap in (None, torch.randint(0, 5, (B,), device="cuda", generator=g)):
        target = torch.randint(0, V_, (B, 64), device="cuda", generator=g)
        want = V._accept(target, rows.tokens, None, rows, sampling, rows.parent, rows.retrieve, cap)
        got = accept.accept(target, rows.tokens, rows.parent, rows.retrieve, cap)
        assert all(torch.equal(a, b) for a, b in zip(got, (want.path, want.length, want.tokens, want.last_node)))


def test_dynamic_step_cost_report(gpu_stack):
    """Prints the greedy step time (graph replay + the host sync) of static and dynamic trees of
    64 and 16 nodes at batch 1, 16 and 64 (idle rows, context 256) for the record."""
    s = gpu_stack
    rows = {}
    for tree in ("tree16", "dynamic16", "tree64", "dynamic64"):
        eng = Engine(s.model, s.heads, tree, max_batch=64, max_seq_len=1024, trees={})
        r = eng.runner
        t = eng.default_tree
        for b in (1, 16, 64):
            Bb = r.bucket(b)
            rows[(tree, b)] = round(1000 * r.time_step(t, Bb, r.kv_len(256, t.num_nodes), [256] * Bb, repeats=10), 3)
        del eng
        torch.cuda.empty_cache()
    print({f"{t}@{b}": ms for (t, b), ms in rows.items()})
    assert all(v > 0 for v in rows.values())
