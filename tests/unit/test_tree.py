"""Tree buffers on hand-drawn trees, named trees, JSON files and the tree search."""
import json

import pytest
import torch

from medusa.decoding.tree import (NAMED_TREES, build_tree, expected_accept_length, load_tree,
                                  search_tree)
from medusa.errors import TreeError

# root(0) -> a=(0,) [1], b=(1,) [2];  a -> c=(0,0) [3], d=(0,1) [4];  b -> e=(1,0) [5];  c -> f=(0,0,0) [6]
HAND = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_hand_drawn_tree_buffers():
    t = build_tree(HAND)
    assert t.num_nodes == 7 and t.max_depth == 3 and t.topk == 2
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.parent.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert t.head.tolist() == [-1, 0, 0, 1, 1, 1, 2]
    assert t.rank.tolist() == [0, 0, 1, 0, 1, 0, 0]
    expected_mask = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(t.mask, expected_mask)
    # leaves: d=(0,1), e=(1,0), f=(0,0,0); paths padded with -1
    assert t.retrieve.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]


def test_order_of_input_paths_does_not_matter():
    a, b = build_tree(HAND), build_tree(list(reversed(HAND)))
    assert a.paths == b.paths and torch.equal(a.mask, b.mask) and torch.equal(a.retrieve, b.retrieve)


def test_ar_tree_is_the_root_alone():
    t = load_tree("ar")
    assert t.num_nodes == 1 and t.retrieve.tolist() == [[0]] and t.mask.tolist() == [[True]]


@pytest.mark.parametrize("name", [n for n in NAMED_TREES if n != "ar"])
def test_named_trees_are_valid(name):
    t = load_tree(name)
    size = {"chain": 5, "tree2": 2, "tree4": 4, "tree8": 8, "tree16": 16, "tree32": 32, "tree64": 64}[name]
    assert t.num_nodes == size
    # every node's mask row is exactly its ancestors and itself
    for i in range(t.num_nodes):
        anc, j = {i}, i
        while j:
            j = int(t.parent[j])
            anc.add(j)
        assert set(torch.nonzero(t.mask[i]).flatten().tolist()) == anc


@pytest.mark.parametrize("bad", [[[0], [0, 0, 0]], [[0], [-1]], [[]], "x", [[0], [0]]])
def test_malformed_trees_are_refused(bad):
    with pytest.raises(TreeError):
        build_tree(bad)


def test_tree_json_file(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"paths": HAND}))
    assert load_tree(f).num_nodes == 7
    f.write_text("[[0], [0, 0")
    with pytest.raises(TreeError, match="malformed"):
        load_tree(f)
    with pytest.raises(TreeError, match="unknown tree"):
        load_tree(tmp_path / "missing.json")


def test_tree_search_matches_hand_calculation():
    acc = [[0.6, 0.2, 0.1], [0.5, 0.3, 0.1]]
    # candidates by path probability: (0)=.6, (1)=.2, (0,0)=.3, (0,1)=.18, (2)=.1, (1,0)=.1, (0,2)=.06
    assert search_tree(acc, 1) == []
    assert search_tree(acc, 2) == [(0,)]
    assert search_tree(acc, 4) == [(0,), (1,), (0, 0)]
    assert search_tree(acc, 5) == [(0,), (1,), (0, 0), (0, 1)]
    paths = search_tree(acc, 5)
    assert expected_accept_length(paths, acc) == pytest.approx(1 + 0.6 + 0.2 + 0.3 + 0.18)
    # more nodes never lower the expected length, and the search beats a chain of equal size
    lens = [expected_accept_length(search_tree(acc, n), acc) for n in range(1, 8)]
    assert lens == sorted(lens)
    assert expected_accept_length(search_tree(acc, 3), acc) >= expected_accept_length([(0,), (0, 0)], acc)


def test_path_counts_count_every_prefix_up_to_the_first_miss():
    from medusa.decoding.tree import path_counts

    ranks = torch.tensor([[0, 1, 0], [0, 1, 3], [3, 0, 0], [1, 0, 0]])  # 3 = not in the top-3
    assert path_counts(ranks, 3) == {(0,): 2, (0, 1): 2, (0, 1, 0): 1, (1,): 1, (1, 0): 1, (1, 0, 0): 1}


def _brute_force_best(counts, n):
    """Every prefix-closed set of n - 1 observed paths, the best total count (small cases only)."""
    import itertools

    best = -1
    for combo in itertools.combinations(sorted(counts), n - 1):
        s = set(combo)
        if all(p[:-1] in s or len(p) == 1 for p in s):
            best = max(best, sum(counts[p] for p in s))
    return best


def test_counted_search_is_optimal_and_uses_joint_behaviour():
    from medusa.decoding.tree import counted_accept_length, path_counts, search_tree_counts

    g = torch.Generator().manual_seed(0)
    # joint behaviour the rank table cannot see: when head 0 is right at rank 1, head 1 is right at rank 2
    rows = []
    for _ in range(200):
        r0 = int(torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 1, generator=g))
        r1 = 2 if r0 == 1 else int(torch.multinomial(torch.tensor([0.6, 0.2, 0.1, 0.1]), 1, generator=g))
        rows.append([r0, r1])
    ranks = torch.tensor(rows)
    counts = path_counts(ranks, 3)
    for n in range(1, 8):
        paths = search_tree_counts(counts, n)
        assert len(paths) == min(n - 1, len(counts))
        build_tree(paths)  # a valid tree: every node's parent is in it
        assert sum(counts[p] for p in paths) == _brute_force_best(counts, len(paths) + 1)
        # the counted length is what a step accepts at each position, walked directly
        walked = 0
        for r in rows:
            d = 0
            while d < 2 and tuple(r[: d + 1]) in set(paths):
                d += 1
            walked += d
        assert counted_accept_length(paths, counts, len(rows)) == pytest.approx(1 + walked / len(rows))
    assert (1, 2) in search_tree_counts(counts, 5)  # found from the joint counts
    assert search_tree_counts({}, 4) == [] and search_tree_counts(counts, 1) == []
    with pytest.raises(TreeError):
        search_tree_counts(counts, 0)


# ------------------------------------------------------------------ lookup chains

def test_lookup_chain_hangs_from_the_root_after_the_head_nodes():
    t = build_tree(HAND, "hand", lookup=3)
    assert (t.num_nodes, t.head_nodes, t.max_depth, t.accept_depth) == (10, 7, 3, 3)
    assert t.parent[7:].tolist() == [0, 7, 8] and t.depth[7:].tolist() == [1, 2, 3] and t.head[7:].tolist() == [-1] * 3
    # a chain node sees the root, the chain above it and itself; no head node sees a chain node and vice versa
    assert t.mask[9].nonzero().flatten().tolist() == [0, 7, 8, 9]
    assert not t.mask[:7, 7:].any() and not t.mask[7:, 1:7].any()
    assert t.retrieve[-1].tolist() == [0, 7, 8, 9]  # the chain is the last path: ties go to the heads' paths
    plain = build_tree(HAND, "hand")
    h = t.heads_only
    assert h.name == "hand" and h.lookup == 0 and h.num_nodes == 7
    for f in ("mask", "depth", "parent", "head", "rank", "retrieve"):
        assert torch.equal(getattr(h, f), getattr(plain, f)), f


def test_a_lookup_chain_deeper_than_the_heads_widens_the_paths():
    t = build_tree([[0], [0, 0]], "two", lookup=5)
    assert (t.max_depth, t.accept_depth) == (2, 5)
    assert t.retrieve.tolist() == [[0, 1, 2, -1, -1, -1], [0, 3, 4, 5, 6, 7]]
    assert t.heads_only.retrieve.tolist() == [[0, 1, 2]]


def test_lookup_spec_and_json(tmp_path):
    t = load_tree("tree8+lookup4")
    assert t.name == "tree8+lookup4" and t.lookup == 4 and t.paths == load_tree("tree8").paths
    assert load_tree("tree8+lookup0").lookup == 0
    f = tmp_path / "t.json"
    f.write_text(t.to_json())
    back = load_tree(str(f))
    assert back.lookup == 4 and back.paths == t.paths and torch.equal(back.mask, t.mask)
    assert load_tree(f"{f}+lookup2").lookup == 2  # the suffix replaces the file's chain
    for bad in ("tree8+lookupx", "tree8+lookup99"):
        with pytest.raises(TreeError):
            load_tree(bad)


def test_sub_trees_of_a_lookup_tree():
    from medusa.decoding.tree import accepted_within, nodes_inside

    big = load_tree("tree8+lookup4")
    inside = nodes_inside(big, load_tree("tree4+lookup2"))
    assert inside is not None and len(inside) == big.num_nodes
    assert inside[big.head_nodes:] == (True, True, False, False)
    assert nodes_inside(load_tree("tree8"), load_tree("tree4+lookup2")) is None  # no chain to hold it
    chain = list(range(big.head_nodes, big.num_nodes))  # a step that accepted the whole lookup chain
    assert accepted_within(chain, inside) == 2 and accepted_within(chain, nodes_inside(big, load_tree("tree4"))) == 0
