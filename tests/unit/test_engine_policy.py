"""The engine's pure parts on hand-made numbers: the load-adaptive tree choice, its acceptance and
step-cost estimates, the KV row pool's bookkeeping, and stop detection."""
from __future__ import annotations

import random

import pytest
import torch

from medusa.decoding.adaptive import AcceptanceMeter, StepCostModel, TreeOption, batch_bucket, choose_tree
from medusa.decoding.kv_pool import RowPool, Swap, state_rows, swap_cache_rows, swap_state_rows, write_back
from medusa.decoding.stopping import stop_cut
from medusa.model.kv_cache import KVCache

OPTIONS = [TreeOption("ar", 1, 1.0), TreeOption("chain", 5, 2.0), TreeOption("tree64", 64, 3.0)]


def gpu_like(batch: int, nodes: int) -> float:
    """Memory-bound until ~256 tokens per step, then linear in tokens."""
    return 0.010 * max(1.0, batch * nodes / 256)


def test_choice_follows_the_load():
    assert choose_tree(1, 1, OPTIONS, gpu_like).tree == "tree64"  # 64 tokens: free, 3 tokens per step
    assert choose_tree(16, 16, OPTIONS, gpu_like).tree == "chain"  # 80 tokens free, 1024 are 4x the cost
    c = choose_tree(256, 256, OPTIONS, gpu_like)
    assert c.tree == "ar" and "ar" in c.reason
    assert c.rates["ar"] == pytest.approx(256 / 0.010)


def test_choice_counts_rows_that_do_not_speculate():
    flat = lambda b, n: 0.01 * (1 + 0.02 * b * n)  # noqa: E731
    assert choose_tree(8, 8, OPTIONS, flat).tree != "ar"
    assert choose_tree(8, 0, OPTIONS, flat).tree == "ar"  # nobody gains from the tree: pure cost


def test_choice_explores_unknown_costs_smallest_first_and_breaks_ties_small():
    known = {(4, 1): 0.01}
    c = choose_tree(4, 4, OPTIONS, lambda b, n: known.get((b, n)))
    assert c.tree == "chain" and c.reason.startswith("exploring")
    same = [TreeOption("ar", 1, 1.0), TreeOption("chain", 5, 1.0)]
    assert choose_tree(4, 4, same, lambda b, n: 0.01).tree == "ar"


def test_choice_skips_exploring_trees_that_cannot_win():
    """A CPU-like device: the chain measured at 5x the plain step. tree64 (3 tokens per step) could
    reach at most 12 tokens per 0.05 s = 240 tokens/s, under plain's 400: no exploring step."""
    known = {(4, 1): 0.01, (4, 5): 0.05}
    c = choose_tree(4, 4, OPTIONS, lambda b, n: known.get((b, n)))
    assert c.tree == "ar" and not c.reason.startswith("exploring")
    assert c.rates["tree64"] is None
    # when the same bound leaves room to win, the tree is still explored
    cheap = {(4, 1): 0.01, (4, 5): 0.011}
    c = choose_tree(4, 4, OPTIONS, lambda b, n: cheap.get((b, n)))
    assert c.tree == "tree64" and c.reason.startswith("exploring")


def test_choice_margin_keeps_plain_decoding_on_near_ties():
    """A tree promising 5% more than plain decoding stays unused under a 10% margin; 20% wins."""
    opts = [TreeOption("ar", 1, 1.0), TreeOption("chain", 5, 2.0)]
    near = lambda b, n: 0.010 if n == 1 else 0.019  # noqa: E731  (2 tokens / 0.019 s = 1.05x plain)
    assert choose_tree(8, 8, opts, near).tree == "chain"
    assert choose_tree(8, 8, opts, near, margin=0.1).tree == "ar"
    clear = lambda b, n: 0.010 if n == 1 else 0.0166  # noqa: E731  (1.2x plain)
    assert choose_tree(8, 8, opts, clear, margin=0.1).tree == "chain"


def test_acceptance_meter_optimistic_until_explored():
    m = AcceptanceMeter({"chain": 2.0, "tree64": 3.0}, explore=4)
    m.record("chain", [1, 1])
    assert m.optimistic("chain") == 2.0 and m.optimistic("tree64") == 3.0  # too few rows: the prior
    m.record("chain", [1, 2])
    assert m.optimistic("chain") == pytest.approx(1.25)  # explored: the measurement
    assert m.optimistic("tree64") == 3.0  # not ruled out by how the chain did


def test_acceptance_meter_scales_unmeasured_trees_by_measured_ones():
    m = AcceptanceMeter({"chain": 3.0, "tree64": 5.0}, warmup=4)
    assert m.expected("tree64") == 5.0  # nothing measured: the prior
    m.record("chain", [1, 2, 1, 2])  # mean 1.5: half the prior's gain
    assert m.expected("chain") == pytest.approx(1.5)
    assert m.expected("tree64") == pytest.approx(1.0 + 0.25 * 4.0)
    m.record("chain", [3] * 600)  # exponential average follows a change (10 steps of 64 rows)
    assert m.expected("chain") > 2.9


def test_step_cost_model_table_online_and_extrapolation():
    table = {(1, 1): 0.008, (1, 16): 0.010, (1, 128): 0.024}  # batch-1 forwards over N query tokens
    cm = StepCostModel(table)
    assert cm(1, 16) == pytest.approx(0.010)
    assert cm(4, 16) == pytest.approx(0.010 + 0.014 * 48 / 112)  # 64 tokens per forward
    assert cm(16, 16) == pytest.approx(0.048)  # proportional past the table
    assert cm(1, 128) == cm(128, 1)
    for s in (9.0, 0.02, 0.02):  # the first (warm-up) sample is dropped
        cm.record(3, 1, s)
    assert cm(4, 1) == pytest.approx(0.02)  # measured: batch 3 and 4 share a bucket
    online = StepCostModel()
    assert online(4, 5) is None  # nothing known: the policy explores
    online.record(4, 1, 0.02)
    online.record(4, 1, 0.02)
    online.record(4, 5, 0.04)
    online.record(4, 5, 0.04)
    assert online(4, 9) == pytest.approx(0.04 + 0.005 * 4)  # linear over nodes from two measured trees
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]


def test_seeded_costs_follow_the_real_steps_at_the_same_batch_size():
    """Warm-up times (idle rows, short context) stand in until real steps of that kind are timed,
    scaled by how the real steps at the same batch bucket compare with their own seeds."""
    m = StepCostModel()
    m.seed(64, 1, 0.010)
    m.seed(64, 16, 0.020)
    m.seed(8, 16, 0.012)
    assert m(64, 16) == pytest.approx(0.020)
    for _ in range(3):
        m.record(64, 1, 0.015)  # contexts grew: plain steps take 1.5x their warm-up time
    assert m(64, 1) == pytest.approx(0.015)
    assert m(64, 16) == pytest.approx(0.030)  # unused tree: its seed, scaled the same
    assert m(8, 16) == pytest.approx(0.012)  # another batch bucket: its own seed
    for _ in range(3):
        m.record(64, 16, 0.025)
    assert m(64, 16) == pytest.approx(0.025)  # timed for real: the measurement


def test_batch1_table_turns_the_choice_plain_under_load():
    """A memory-bound device: flat until 256 tokens per forward. The tree shrinks as the load grows."""
    table = {(1, q): 0.01 * max(1.0, q / 256) for q in (1, 16, 64, 256, 1024, 4096)}
    cm = StepCostModel(table)
    assert choose_tree(1, 1, OPTIONS, cm).tree == "tree64"
    assert choose_tree(64, 64, OPTIONS, cm).tree == "chain"
    assert choose_tree(256, 256, OPTIONS, cm).tree == "ar"


# ------------------------------------------------------------------ the row pool

def check_invariant(p: RowPool) -> None:
    assert all(p.owner[r] is not None for r in range(p.n_active))
    assert all(p.owner[r] is None for r in range(p.n_active, p.rows))
    assert all(p.session[p.lru[s]] == s for s in p.lru)
    assert p.free + p.kept + p.n_active == p.rows


def test_pool_keeps_running_rows_first_and_sessions_lru():
    p = RowPool(rows=3, max_active=2)
    a = p.admit("a", [1, 2, 3], "s1")
    b = p.admit("b", [4, 5], "s2")
    assert (a.row, b.row, p.can_admit()) == (0, 1, False)
    p.length[0], p.length[1] = 4, 3
    swaps = p.release(0, "s1", [1, 2, 3, 9])  # row 0 leaves: the last running row moves in
    assert swaps == [Swap(0, 1, 4, 3)] and p.owner[0] == "b" and p.lru["s1"] == 1
    check_invariant(p)
    c = p.admit("c", [1, 2, 3, 9, 7], "s1")  # continues s1: reuses its 4 tokens, already at row 1
    assert (c.row, c.reused, c.swaps) == (1, 4, [])
    p.release(1, "s1", [1, 2, 3, 9, 7, 8])
    p.release(0, "s2", [4, 5, 6])
    check_invariant(p)
    assert list(p.lru) == ["s1", "s2"] and p.free == 1
    d = p.admit("d", [1, 1], None)  # takes the free row, evicts nothing
    assert d.evicted is None and d.reused == 0
    e = p.admit("e", [2, 2], "s3")  # no free row: evicts the least recent session
    assert e.evicted == "s1" and list(p.lru) == ["s2"]
    check_invariant(p)
    f = p.release(e.row)
    assert f == [] and p.n_active == 1


def test_pool_random_walk_never_leaks():
    rng = random.Random(0)
    p = RowPool(rows=5, max_active=3)
    running: list[str] = []
    for i in range(500):
        if running and (not p.can_admit() or rng.random() < 0.5):
            rid = running.pop(rng.randrange(len(running)))
            sid = rng.choice([None, "x", "y", "z", "w"])
            p.release(p.owner.index(rid), sid, [1] * rng.randint(1, 5) if sid else None)
        else:
            p.admit(f"r{i}", [1, 2, 3], rng.choice([None, "x", "y", "z", "w"]))
            running.append(f"r{i}")
        check_invariant(p)
        assert sorted(x for x in p.owner if x) == sorted(running)


def test_tensor_row_helpers():
    cache = KVCache(torch.stack([torch.arange(2 * 3 * 1 * 4 * 1.0).view(2, 3, 1, 4, 1), torch.zeros(2, 3, 1, 4, 1)], 1))
    before = cache.k.clone()
    swap_cache_rows(cache, Swap(0, 2, 2, 3))
    assert torch.equal(cache.k[:, 0, :, :3], before[:, 2, :, :3]) and torch.equal(cache.k[:, 2, :, :2], before[:, 0, :, :2])
    # a head state declares its rows (kv_pool.PerRow): its RoPE table has as many rows as the
    # pool here, and stays as it is
    from medusa.heads.hydra import HydraState

    table = torch.arange(6.0).view(3, 2)
    state = HydraState(KVCache(cache.kv.clone()), torch.arange(3.0)[:, None], table, table)
    kv = state.cache.kv.clone()
    swap_state_rows(state, 0, 1)
    assert state.last.flatten().tolist() == [1.0, 0.0, 2.0] and state.rope_cos.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(state.cache.kv[:, :, 0], kv[:, :, 1]) and torch.equal(state.cache.kv[:, :, 1], kv[:, :, 0])
    view = state_rows(state, 1, 3)
    assert view.last.shape == (2, 1) and view.rope_cos is state.rope_cos
    view.last = view.last + 10  # a head family that rebinds instead of writing in place
    write_back(state, view, 1, 3)
    assert state.last.flatten().tolist() == [1.0, 10.0, 12.0]


def test_stop_cut():
    assert stop_cut([5, 1, 2, 3], 0, {3}, []) == (4, "eos")
    assert stop_cut([5, 1, 2, 3], 2, set(), [[1, 2]]) == (3, "stop")  # a stop sequence that began earlier
    assert stop_cut([5, 1, 2, 3], 3, set(), [(1, 2)]) is None  # already checked before new_from
    assert stop_cut([7, 7], 0, set(), [()]) is None
