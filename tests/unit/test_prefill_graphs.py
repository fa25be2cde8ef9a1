"""Prefill at bucketed shapes (staging.py through runner.py, run eagerly here: the GPU replays the same
forward as a CUDA graph) gives what the direct prefill gives: the same first tokens, hidden
states, K/V in every real slot and draft-head state; and the split of admitted prompts into
forwards (plan_groups) is the cheapest one."""
import random

import pytest
import torch

from medusa.decoding.staging import FIXED_TOKENS, PrefillStage, plan_groups
from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.step import DecodeState, first_token, prefill

from tests.unit.test_engine import prompts, random_heads, tiny_model


def test_shapes_respect_the_capacity():
    pg = PrefillStage(tiny_model(), max_rows=6, max_len=128, capacity=256)
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
    pg = PrefillStage(model, max_rows=4, max_len=64, capacity=256, heads=heads)
    assert pg.observes == (head_type == "hydra++")  # heads with state see the prompt in the graph
    old = torch.tensor(prompts(4, seed=9, lo=40, hi=40))
    pg.run(old, model.new_cache(4, 80), torch.full((4,), 40), heads.new_state(4, 80, model))  # stale buffers

    def run(staged: bool):
        cache = model.new_cache(k, 80)
        hs = heads.new_state(k, 80, model)
        if not staged:
            return cache, prefill(model, heads, cache, tokens, start, sampling, None, hs, lengths)
        root, last, _ = first_token(model, pg.run(tokens, cache, lengths, hs), lengths, sampling, None)
        return cache, DecodeState(cache, lengths, root, last, hs)

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


def _brute_force(lengths, cost):
    """The cheapest split of lengths into consecutive groups, by trying every one (2^(n-1))."""
    n, best = len(lengths), None
    for mask in range(1 << (n - 1)):
        sizes, k = [], 1
        for i in range(n - 1):
            if mask >> i & 1:
                sizes.append(k)
                k = 1
            else:
                k += 1
        sizes.append(k)
        total, i = 0.0, 0
        for k in sizes:
            c = cost(k, max(lengths[i:i + k]))
            if c is None:
                total = None
                break
            total, i = total + c, i + k
        if total is not None and (best is None or total < best[0] - 1e-9):
            best = (total, sizes)
    return best


def test_plan_groups_finds_the_cheapest_split():
    """Against every split of short random inputs, with a padded-bucket cost and a capacity."""
    rng = random.Random(3)

    def bucketed(fixed, capacity):
        def cost(k, T):
            R, Tb = 1 << (k - 1).bit_length(), max(16, 1 << (T - 1).bit_length())
            return None if R * Tb > capacity else fixed + R * Tb
        return cost

    for trial in range(60):
        lengths = sorted(rng.randint(5, 300) for _ in range(rng.randint(1, 9)))
        cost = bucketed(rng.choice([0, 64, 512, 4096]), rng.choice([512, 1024, 8192]))
        sizes = plan_groups(lengths, cost)
        assert sum(sizes) == len(lengths) and all(k > 0 for k in sizes)
        total, i = 0.0, 0
        for k in sizes:
            total, i = total + cost(k, max(lengths[i:i + k])), i + k
        assert total == pytest.approx(_brute_force(lengths, cost)[0])


def test_plan_groups_trades_padding_for_forwards():
    lengths = [40, 50, 60, 62, 300]  # one long prompt: in one forward every prompt pads to 512

    def cost(fixed):
        return lambda k, T: fixed + (1 << (k - 1).bit_length()) * max(16, 1 << (T - 1).bit_length())

    assert plan_groups(lengths, cost(4096)) == [5]  # forwards dear: one, whatever the padding
    assert plan_groups(lengths, cost(64)) == [4, 1]  # 4 x 64 slots + 512, against 8 x 512
    assert plan_groups([10] * 5, lambda k, T: None if k > 2 else 1.0) == [2, 2, 1]  # capacity: 2 rows
    assert plan_groups([600, 700], lambda k, T: None) == [1, 1]  # no forward takes them: each alone
    assert plan_groups([], cost(64)) == []


def test_prefill_cost_uses_measured_bucket_times_and_a_fit_for_the_rest():
    pg = PrefillStage(tiny_model(), max_rows=4, max_len=128, capacity=512)
    assert pg.cost(3, 20) == FIXED_TOKENS + 4 * 32  # nothing measured: fixed cost + padded slots
    assert pg.cost(4, 256) is None  # over the capacity
    for R, Tb in ((1, 16), (4, 32), (2, 128)):  # 2 ms + 8 us a slot
        pg.measured(R, Tb, 0.002 + 8e-6 * R * Tb)
    pg.measured(4, 32, 0.0031)  # off the line: a measured bucket keeps its own time
    assert pg.cost(3, 20) == 0.0031
    assert pg.cost(1, 64) == pytest.approx(0.002 + 64 * 8e-6, rel=0.05)  # unmeasured (1, 64): the fit
