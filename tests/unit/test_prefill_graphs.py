"""Prefill at bucketed shapes (prefill_graphs.py, run eagerly here: the GPU replays the same
forward as a CUDA graph) gives what the direct prefill gives: the same first tokens, hidden
states, K/V in every real slot and draft-head state."""
import pytest
import torch

from medusa.decoding.prefill_graphs import PrefillGraphs, length_buckets
from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.step import prefill

from tests.unit.test_engine import prompts, random_heads, tiny_model


def test_length_buckets():
    assert length_buckets(100) == (16, 32, 64, 100)
    assert length_buckets(8) == (8,)


def test_shapes_respect_the_capacity():
    pg = PrefillGraphs(tiny_model(), max_rows=6, max_len=128, capacity=256, capture=False)
    assert pg.row_buckets == (1, 2, 4, 6)
    assert pg.shape(3, 20) == (4, 32)
    assert pg.shape(6, 40) is None  # 6 x 64 slots > 256
    assert pg.shape(1, 128) == (1, 128)
    assert pg.shape(7, 5) is None  # more rows than the largest bucket
    assert all(R * Tb <= 256 for R, Tb in pg.shapes())
    assert (2, 128) in pg.shapes() and (4, 128) not in pg.shapes()
    assert max(Tb for _, Tb in pg.shapes(40)) == 64


@pytest.mark.parametrize("head_type", ["medusa", "hydra++"])
@torch.inference_mode()
def test_bucketed_prefill_equals_direct(head_type):
    model = tiny_model()
    heads = random_heads(model, head_type)
    ids = prompts(3, seed=4, lo=5, hi=30)
    k, T = len(ids), max(map(len, ids))
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in ids])  # [k, T]
    lengths = torch.tensor([len(p) for p in ids])
    start = torch.zeros(k, dtype=torch.long)
    sampling = BatchSampling.stack([SamplingParams()] * k, "cpu")
    pg = PrefillGraphs(model, max_rows=4, max_len=64, capacity=256, capture=False, heads=heads)
    assert pg.observes == (head_type == "hydra++")  # heads with state see the prompt in the graph
    old = torch.tensor(prompts(4, seed=9, lo=40, hi=40))
    pg.run(old, model.new_cache(4, 80), torch.full((4,), 40), heads.new_state(4, 80, model))  # stale buffers

    def run(body: bool):
        cache = model.new_cache(k, 80)
        hs = heads.new_state(k, 80, model)
        if not body:
            return cache, prefill(model, heads, cache, tokens, start, sampling, None, hs, lengths)
        return cache, prefill(model, None if pg.observes else heads, cache, tokens, start, sampling, None, hs, lengths,
                              lambda t: pg.run(t, cache, lengths, hs))

    (c0, s0), (c1, s1) = run(False), run(True)
    assert torch.equal(s0.root, s1.root) and torch.equal(s0.start, s1.start)
    torch.testing.assert_close(s1.last_hidden, s0.last_hidden)
    for r, n in enumerate(lengths.tolist()):  # real slots; padding slots are overwritten later
        torch.testing.assert_close(c1.k[:, r, :, :n], c0.k[:, r, :, :n])
        torch.testing.assert_close(c1.v[:, r, :, :n], c0.v[:, r, :, :n])
    if head_type == "hydra++":  # the prefix layer saw the same hidden states
        torch.testing.assert_close(s1.head_state.last, s0.head_state.last)
        for r, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(s1.head_state.cache.k[:, r, :, :n], s0.head_state.cache.k[:, r, :, :n])
