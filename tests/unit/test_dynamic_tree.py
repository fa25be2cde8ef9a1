"""Dynamic trees (medusa.decoding.dynamic_tree): the spec grammar, the pure tree builder on
hand-computed cases (top-k probabilities -> chosen nodes, parents, depths, mask, paths, pruning),
verification over per-row trees against a brute-force reference, and the engine: greedy output
equals plain greedy with Medusa and Hydra++ heads, sampled rows are unchanged by speculation."""
from __future__ import annotations

import math

import pytest
import torch

from medusa.decoding.dynamic_tree import (DynamicTree, RowTrees, grow, parse_dynamic, select, smaller_budgets,
                                          with_chain)
from medusa.decoding.engine import Engine, Request
from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.tree import build_tree, load_tree
from medusa.decoding.verify import verify
from medusa.errors import TreeError
from tests.unit.test_engine import alone, prompts, tiny, tiny_heads  # noqa: F401 (tiny, tiny_heads: fixtures)

# ------------------------------------------------------------------ spec


def test_spec_grammar_and_names():
    t = load_tree("dynamic64")
    assert isinstance(t, DynamicTree) and (t.name, t.num_nodes, t.topk, t.threshold, t.max_depth) == ("dynamic64", 64, 10, 0.0, 0)
    t = load_tree("dynamic32x8d3@0.05+lookup4")
    assert (t.nodes, t.topk, t.max_depth, t.threshold, t.lookup, t.num_nodes) == (32, 8, 3, 0.05, 4, 36)
    assert t.name == "dynamic32x8d3@0.05+lookup4" and t.heads_only.name == "dynamic32x8d3@0.05"
    assert t.accept_depth == 4 and t.heads_only.accept_depth == 3
    # uniform columns: column j carries the draw of depth min(j, accept_depth)
    assert t.depth.tolist() == [0, 1, 2, 3] + [4] * 32
    bound = load_tree("dynamic16+lookup2").bind(4)
    assert (bound.name, bound.max_depth, bound.accept_depth) == ("dynamic16+lookup2", 4, 4)
    assert load_tree("dynamic3").bind(4).max_depth == 2  # at most nodes - 1 deep
    with pytest.raises(TreeError, match="deep"):
        load_tree("dynamic16d5").bind(4)
    for bad in ("dynamic1", "dynamic64@1.5", "dynamic64q", "dynamic16d16", "dynamic999"):
        with pytest.raises(TreeError):
            load_tree(bad)
    assert parse_dynamic("tree64") is None and parse_dynamic("dynamic_tree.json") is None
    with pytest.raises(TreeError, match="unknown tree"):
        load_tree("dynamic_tree.json")  # a missing file, not a malformed dynamic spec


def test_smaller_budgets_keep_the_kind():
    assert [t.name for t in smaller_budgets(load_tree("dynamic32@0.02"))] == [
        "dynamic2@0.02", "dynamic4@0.02", "dynamic8@0.02", "dynamic16@0.02"]


# ------------------------------------------------------------------ the builder, by hand

# children of a node by its last token: token -> (children, probabilities), best first
TABLE = {0: ([1, 2], [0.5, 0.4]), 11: ([1, 2], [0.1, 0.8]),
         1: ([3, 4], [0.9, 0.05]), 2: ([5, 6], [0.5, 0.25]),
         3: ([7, 8], [0.8, 0.1]), 5: ([9, 10], [0.3, 0.2]), 6: ([14, 15], [0.5, 0.1])}


def table_children(level, chains):
    """Hydra-like: a node's children depend on its path (here on its last token)."""
    last = chains[..., -1].tolist()
    tok = torch.tensor([[TABLE.get(t, ([20, 21], [0.01, 0.01]))[0] for t in row] for row in last])
    p = torch.tensor([[TABLE.get(t, ([20, 21], [0.01, 0.01]))[1] for t in row] for row in last])
    return tok, p.log()


def test_grow_keeps_the_most_probable_paths_per_row():
    """Row 0 (root 0): pool 1:.5 2:.4 13:.45 14:.025 25:.2 26:.1 137:.36 ... -> keep 1, 2, 13, 137.
    Row 1 (root 11): 1:.1 2:.8 25:.4 26:.2 259:.12 ... -> keep 2, 25, 26, 259."""
    r = grow(table_children, torch.tensor([0, 11]), nodes=5, depth=3, topk=2)
    assert r.tokens.tolist() == [[0, 1, 2, 3, 7], [11, 2, 5, 6, 9]]
    assert r.parent.tolist() == [[0, 0, 0, 1, 3], [0, 0, 1, 1, 2]]
    assert r.depth.tolist() == [[0, 1, 1, 2, 3], [0, 1, 2, 2, 3]]
    assert r.retrieve.tolist() == [
        [[0, -1, -1, -1], [0, 1, -1, -1], [0, 2, -1, -1], [0, 1, 3, -1], [0, 1, 3, 4]],
        [[0, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1], [0, 1, 3, -1], [0, 1, 2, 4]]]
    mask0 = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    assert r.mask[0].int().tolist() == mask0
    assert r.mask[1, 4].int().tolist() == [1, 1, 1, 0, 1]
    assert r.valid.all()


def test_threshold_prunes_improbable_nodes_in_place():
    """p = 0.42 on row 0: 2 (.4) and 137 (.36) stay in the tree's shape but may not be accepted
    (their path is the root alone); every node under a pruned node is pruned too."""
    r = grow(table_children, torch.tensor([0]), nodes=5, depth=3, topk=2, threshold=0.42)
    assert r.tokens.tolist() == [[0, 1, 2, 3, 7]]  # the same nodes: fixed shape
    assert r.valid.tolist() == [[True, True, False, True, False]]
    assert r.retrieve[0, 2].tolist() == [0, -1, -1, -1] and r.retrieve[0, 4].tolist() == [0, -1, -1, -1]
    assert r.retrieve[0, 3].tolist() == [0, 1, 3, -1]


def test_shared_children_and_padding():
    """Medusa-like children (the same top-k for every node of a depth) and a budget larger than
    the pool: the extra nodes hang from the root and are never accepted."""
    def shared(level, chains):
        tok = torch.tensor([[10, 11]]) + 10 * level
        return tok[:, None].expand(chains.shape[0], 1, 2), torch.tensor([[0.6, 0.3]]).log()[:, None]

    r = grow(shared, torch.tensor([5]), nodes=9, depth=2, topk=2)  # pool: 2 + 2 x 2 = 6 < 8
    assert r.tokens[0, :7].tolist() == [5, 10, 11, 20, 21, 20, 21]
    assert r.parent[0, :7].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert r.valid.tolist() == [[True] * 7 + [False] * 2]
    assert r.parent[0, 7:].tolist() == [0, 0] and r.retrieve[0, 7:, 1:].eq(-1).all()


def test_ties_keep_a_parent_before_its_child():
    """A child as probable as its parent (probability 1) never displaces it from the tree."""
    def certain(level, chains):
        B, W, _ = chains.shape
        return torch.tensor([[[7, 8]]]).expand(B, W, 2) + level, torch.tensor([[[0.0, -30.0]]]).expand(B, W, 2)

    r = grow(certain, torch.tensor([1]), nodes=4, depth=3, topk=2)
    assert r.tokens.tolist() == [[1, 7, 8, 9]] and r.depth.tolist() == [[0, 1, 2, 3]]
    assert r.parent.tolist() == [[0, 0, 1, 2]]


def test_select_lays_out_a_hand_written_pool():
    tok = torch.tensor([[4, 5, 6, 7]])
    lp = torch.tensor([[-0.1, -2.0, -0.5, -3.0]], dtype=torch.float64)
    par = torch.tensor([[-1, -1, 0, 1]])
    dep = torch.tensor([1, 1, 2, 2])
    r = select(tok, lp, par, dep, torch.tensor([9]), nodes=4, depth=2)
    assert r.tokens.tolist() == [[9, 4, 5, 6]] and r.parent.tolist() == [[0, 0, 0, 1]]
    assert r.retrieve.tolist() == [[[0, -1, -1], [0, 1, -1], [0, 2, -1], [0, 1, 3]]]


def test_lookup_chain_appended():
    r = grow(table_children, torch.tensor([0]), nodes=5, depth=3, topk=2)
    c = with_chain(r, torch.tensor([[40, 41]]), width=4)
    assert c.tokens.tolist() == [[0, 1, 2, 3, 7, 40, 41]]
    assert c.parent[0, 5:].tolist() == [0, 5] and c.depth[0, 5:].tolist() == [1, 2]
    assert c.mask[0, 6].int().tolist() == [1, 0, 0, 0, 0, 1, 1]
    assert c.retrieve[0, -1].tolist() == [0, 5, 6, -1] and c.retrieve.shape == (1, 6, 4)


# ------------------------------------------------------------------ verification over per-row trees


def brute_force(tokens, target, rows: RowTrees, b: int) -> tuple[int, list[int]]:
    """Deepest valid node whose path matches the targets at each parent; its emitted tokens."""
    best, best_path = 0, [0]
    for i in range(tokens.shape[1]):
        path = [n for n in rows.retrieve[b, i].tolist() if n >= 0]
        if len(path) - 1 <= best:
            continue
        if all(tokens[b, path[d]] == target[b, path[d - 1]] for d in range(1, len(path))):
            best, best_path = len(path) - 1, path
    return best, [int(tokens[b, n]) for n in best_path[1:]] + [int(target[b, best_path[-1]])]


def test_verify_per_row_trees_against_brute_force():
    g = torch.Generator().manual_seed(0)
    B, V = 64, 4  # a small vocabulary: many candidates match
    roots = torch.randint(0, V, (B,), generator=g)

    def children(level, chains):
        Bc, W, _ = chains.shape
        lp = torch.randn(Bc, W, V, generator=g).log_softmax(-1)
        top = lp.topk(3, dim=-1)
        return top.indices, top.values

    rows = grow(children, roots, nodes=12, depth=3, topk=3, threshold=0.05)
    logits = torch.randn(B, 12, V, generator=g) * 3
    s = BatchSampling.stack([SamplingParams()] * B, "cpu")
    acc = verify(logits, rows.tokens, rows, s)
    target = logits.argmax(-1)
    deep = 0
    for b in range(B):
        length, emitted = brute_force(rows.tokens, target, rows, b)
        assert int(acc.length[b]) == length
        assert acc.tokens[b, :length + 1].tolist() == emitted
        deep = max(deep, length)
    assert deep >= 2  # the case is not trivial


def test_verify_of_a_dynamic_tree_equals_the_static_tree_of_the_same_nodes():
    """Every row holding the same tree: per-row tables give what the static Tree gives."""
    static = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    B, N, V = 8, static.num_nodes, 5
    g = torch.Generator().manual_seed(1)
    cand = torch.randint(0, V, (B, N), generator=g)
    logits = torch.randn(B, N, V, generator=g) * 4
    rows = RowTrees(cand, static.parent.expand(B, N), static.depth.expand(B, N), static.mask.expand(B, N, N),
                    static.retrieve.expand(B, -1, -1), torch.ones(B, N, dtype=torch.bool))
    for params in (SamplingParams(), SamplingParams(temperature=1.0, rule="typical", posterior_threshold=0.3)):
        s = BatchSampling.stack([params] * B, "cpu")
        u = torch.rand(B, N, generator=g)
        a, b = verify(logits, cand, static, s, u), verify(logits, cand, rows, s, u)
        for f in ("path", "length", "tokens", "last_node"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


# ------------------------------------------------------------------ the engine


@pytest.mark.parametrize("spec", ["dynamic8", "dynamic16@0.05", "dynamic12x3+lookup5"])
def test_batched_greedy_equals_plain_greedy(tiny, tiny_heads, spec):
    """Mixed switches and sampling rules riding along (a sampled and a typical row): every
    greedy row decodes exactly as plain greedy decoding."""
    t = load_tree(spec)
    eng = Engine(tiny, tiny_heads, t, max_batch=6, max_seq_len=64, trees={t.name: t})
    ps = prompts(6, seed=1)
    modes = ["on", "on", "off", "on", "on", "on"]
    sampled = {1: SamplingParams(temperature=0.8, top_k=5, rule="sample", seed=3),
               4: SamplingParams(temperature=1.0, top_p=0.9, rule="typical", seed=4)}
    hs = [eng.submit(Request(p, max_new_tokens=20, sampling=sampled.get(i, SamplingParams()), speculation=modes[i]))
          for i, p in enumerate(ps)]
    res = [h.result() for h in hs]
    accepted = 0.0
    for i, (p, (out, st)) in enumerate(zip(ps, res)):
        if i in sampled:
            continue
        assert out == alone(tiny, p, None, None, 20), f"row {i}"
        if modes[i] == "on":
            accepted = max(accepted, st.mean_accepted)
    if tiny_heads.config.head_type == "medusa":  # these random Medusa heads are often right: commits are exercised
        assert accepted > 1.0
    assert eng.stats()["running"] == 0


def test_sampled_rows_do_not_depend_on_batchmates_or_speculation(tiny, tiny_heads):
    t = load_tree("dynamic12")
    ps = prompts(4, seed=2)
    sp = SamplingParams(temperature=0.9, rule="sample", seed=11)

    def run(batch, mode):
        eng = Engine(tiny, tiny_heads, t, max_batch=4, max_seq_len=64, trees={t.name: t})
        others = [eng.submit(Request(p, max_new_tokens=12)) for p in ps[1:batch]]
        out = eng.submit(Request(ps[0], max_new_tokens=12, sampling=sp, speculation=mode)).result()[0]
        for h in others:
            h.result()
        return out

    ref = run(1, "off")
    assert run(4, "on") == ref  # token j always draws uniform j, whatever the tree of the step


def test_engine_offers_smaller_dynamic_budgets_under_load(tiny, tiny_heads):
    eng = Engine(tiny, tiny_heads, "dynamic32@0.02", max_batch=2, max_seq_len=64)
    assert sorted(eng.trees, key=lambda n: eng.trees[n].num_nodes) == [
        "ar", "dynamic2@0.02", "dynamic4@0.02", "dynamic8@0.02", "dynamic16@0.02", "dynamic32@0.02"]
    assert all(t.max_depth == min(3, t.num_nodes - 1) for n, t in eng.trees.items() if n != "ar")  # bound to 3 heads
    ps = prompts(3, seed=4)
    hs = [eng.submit(Request(p, max_new_tokens=16, speculation="auto")) for p in ps]
    assert [h.result()[0] for h in hs] == [alone(tiny, p, None, None, 16) for p in ps]
    from medusa.decoding.engine.policy import priors

    # before any step, a dynamic tree is expected to accept what the best static tree of its size does
    static = build_tree([(0,), (1,), (0, 0)], "tree4")
    p = priors({"d": eng.trees["dynamic4@0.02"], "s": static}, tiny_heads)
    assert p["d"] >= p["s"] > 1.0


def test_a_dynamic_and_a_static_tree_of_as_many_nodes_do_not_share_an_engine(tiny, tiny_heads):
    with pytest.raises(TreeError, match="4 nodes"):
        Engine(tiny, tiny_heads, "dynamic4", max_batch=1, max_seq_len=64, trees={"tree4": load_tree("tree4")})


def test_cli_rejects_a_malformed_dynamic_tree(capsys):
    from medusa.cli import main

    assert main(["generate", "hi", "--tree", "dynamic64@2"]) == 2
    err = capsys.readouterr().err
    assert "threshold" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_modes_and_tree_specs_pass_dynamic_trees_through():
    """`medusa bench --modes hydra:dynamic64` and `--tree +lookup8` over a dynamic default tree."""
    from medusa.bench.decode import parse_modes
    from medusa.decoding.tree import resolve_tree

    specs = parse_modes("ar,hydra:dynamic64,hydra:dynamic32@0.02+lookup16")
    trees = [resolve_tree(s.tree, lambda: load_tree("tree16")) for s in specs[1:]]
    assert [(t.name, t.num_nodes) for t in trees] == [("dynamic64", 64), ("dynamic32@0.02+lookup16", 48)]
    assert resolve_tree("+lookup8", lambda: load_tree("dynamic64")).name == "dynamic64+lookup8"
