"""Sparse candidate trees, in the Medusa paper's format: a list of top-k index paths, e.g.
`(0,)` = head 0's best guess, `(1, 0)` = head 0's second guess followed by head 1's best.
Node 0 is the root (the token the base model already chose); node i > 0 is `paths[i-1]`.

A tree may also carry a lookup chain (`lookup` = L): L more nodes after the heads' nodes, a
chain hanging from the root, whose tokens do not come from the heads but from the sequence
itself (medusa.decoding.lookup: what followed the latest earlier occurrence of its last few
tokens). Verification treats them like any node, so output is unchanged; a step accepts the
longer of the two branches, and the chain may run deeper than the heads guess.

Pure functions build immutable buffers (ancestor mask, depths, top-k indices, retrieval
paths) and search the tree with the largest expected accepted length for a node budget.
This module knows nothing of models, heads or acceptance rules."""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, fields
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from medusa.decoding.dynamic_tree import dynamic_tree, is_dynamic, parse_dynamic
from medusa.errors import TreeError

Path_ = tuple[int, ...]


@dataclass(frozen=True)
class Tree:
    paths: tuple[Path_, ...]  # sorted by (depth, indices); node i+1 is paths[i]
    mask: torch.Tensor  # [N, N] bool: node i may attend to node j (j is i or an ancestor)
    depth: torch.Tensor  # [N] long: position offset from the root (root 0)
    parent: torch.Tensor  # [N] long: parent node (root: 0)
    head: torch.Tensor  # [N] long: draft head that guesses the node (depth - 1; root and lookup nodes: -1)
    rank: torch.Tensor  # [N] long: index of the node's token in its head's top-k (root: 0)
    retrieve: torch.Tensor  # [P, D+1] long: node ids of each root-to-leaf path, padded with -1 (the lookup chain last)
    name: str = "custom"
    lookup: int = 0  # L: nodes N-L .. N-1 are a chain from the root proposed by prompt lookup, not by the heads

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1 + self.lookup

    @property
    def head_nodes(self) -> int:
        """Nodes 0 .. head_nodes-1: the root and the heads' guesses."""
        return len(self.paths) + 1

    @cached_property  # the engine asks every step
    def max_depth(self) -> int:
        """How far ahead the heads guess (the lookup chain aside)."""
        return max((len(p) for p in self.paths), default=0)

    @cached_property
    def accept_depth(self) -> int:
        """The most candidates a step can accept: the heads' depth or the lookup chain's."""
        return max(self.max_depth, self.lookup)

    @cached_property
    def heads_only(self) -> "Tree":
        """The tree without its lookup chain (itself when it has none), on the same device:
        what the heads propose for, and what a step takes when lookup may not be used."""
        if not self.lookup:
            return self
        n, d = self.head_nodes, self.max_depth + 1
        return Tree(self.paths, self.mask[:n, :n], self.depth[:n], self.parent[:n], self.head[:n], self.rank[:n],
                    self.retrieve[:-1, :d], _base_name(self.name))

    @cached_property
    def topk(self) -> int:
        return 1 + max((max(p) for p in self.paths), default=0)

    def to(self, device) -> "Tree":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Tree(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "paths": [list(p) for p in self.paths]}
                          | ({"lookup": self.lookup} if self.lookup else {}))


MAX_LOOKUP = 32  # the longest lookup chain a tree may carry (the runners' draft buffers hold this many)
LOOKUP_SUFFIX = "+lookup"


def build_tree(paths, name: str = "custom", lookup: int = 0) -> Tree:
    """Validate top-k index paths and compute the tree's buffers; `lookup` appends a chain of that
    many lookup nodes to the root."""
    if not isinstance(lookup, int) or not 0 <= lookup <= MAX_LOOKUP:
        raise TreeError(f"a lookup chain holds 0 to {MAX_LOOKUP} nodes, got {lookup!r}")
    try:
        ps = sorted({tuple(int(i) for i in p) for p in paths}, key=lambda p: (len(p), p))
    except (TypeError, ValueError):
        raise TreeError("a tree is a list of paths, each a list of non-negative integers") from None
    if len(ps) != len(list(paths)):
        raise TreeError("the tree lists a path twice")
    index = {(): 0}
    for i, p in enumerate(ps):
        if not p or min(p) < 0:
            raise TreeError(f"bad path {list(p)}: paths are non-empty lists of indices >= 0")
        if p[:-1] not in index:
            raise TreeError(f"path {list(p)} has no parent {list(p[:-1])} in the tree")
        index[p] = i + 1
    n = len(ps) + 1
    mask = torch.eye(n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    parent = torch.zeros(n, dtype=torch.long)
    head = torch.full((n,), -1, dtype=torch.long)
    rank = torch.zeros(n, dtype=torch.long)
    mask[:, 0] = True
    for p, i in index.items():
        if not p:
            continue
        depth[i], parent[i], head[i], rank[i] = len(p), index[p[:-1]], len(p) - 1, p[-1]
        for k in range(1, len(p)):
            mask[i, index[p[:k]]] = True
    leaves = [p for p in index if not any(len(q) == len(p) + 1 and q[:-1] == p for q in index)]
    max_d = max(len(p) for p in index)
    retrieve = torch.full((len(leaves), max_d + 1), -1, dtype=torch.long)
    for r, leaf in enumerate(sorted(leaves, key=lambda p: (len(p), p))):
        for k in range(len(leaf) + 1):
            retrieve[r, k] = index[leaf[:k]]
    if lookup:  # nodes n .. n+L-1: a chain from the root, each attending to the root and the chain above it
        L, m = lookup, n + lookup
        chain_ids = torch.arange(n, m)
        big = torch.zeros(m, m, dtype=torch.bool)
        big[:n, :n] = mask
        big[n:, 0] = True
        big[n:, n:] = torch.ones(L, L, dtype=torch.bool).tril()
        mask = big
        depth = torch.cat([depth, torch.arange(1, L + 1)])
        parent = torch.cat([parent, torch.cat([torch.zeros(1, dtype=torch.long), chain_ids[:-1]])])
        head = torch.cat([head, torch.full((L,), -1, dtype=torch.long)])
        rank = torch.cat([rank, torch.zeros(L, dtype=torch.long)])
        width = max(max_d, L) + 1
        retrieve = torch.cat([torch.nn.functional.pad(retrieve, (0, width - retrieve.shape[1]), value=-1),
                              torch.cat([torch.zeros(1, dtype=torch.long), chain_ids,
                                         torch.full((width - 1 - L,), -1, dtype=torch.long)])[None]])
    return Tree(tuple(ps), mask, depth, parent, head, rank, retrieve, name, lookup)


def _base_name(name: str) -> str:
    """A tree's name without its `+lookup<L>` suffix."""
    return name.split(LOOKUP_SUFFIX)[0]


def with_lookup(tree: Tree, lookup: int) -> Tree:
    """`tree`'s head paths with a lookup chain of `lookup` nodes (0: none), named `<name>+lookup<L>`
    (a dynamic tree: the same spec with that chain)."""
    base = _base_name(tree.name)
    if is_dynamic(tree):
        return dynamic_tree(tree.nodes, tree.topk, tree.depth_limit, tree.threshold, lookup, name=base)
    return build_tree(tree.paths, f"{base}{LOOKUP_SUFFIX}{lookup}" if lookup else base, lookup)


def own_tree(config, label: str) -> Tree:
    """The tree stored with draft heads (HeadsConfig.tree), with the lookup chain their config
    asks for (extra["lookup"], measured with them), named `<label>-tree[+lookup<L>]`."""
    return with_lookup(build_tree(config.tree, name=f"{label}-tree"), int(config.extra.get("lookup", 0) or 0))


def resolve_tree(spec: str | None, default: Callable[[], Tree]) -> Tree:
    """load_tree(spec), where no spec, or a `+lookup<L>` suffix alone, takes `default()`'s tree
    (with that chain)."""
    name, lookup = split_lookup(spec or "")
    tree = load_tree(name) if name else default()
    return with_lookup(tree, lookup) if lookup is not None else tree


def split_lookup(spec: str) -> tuple[str, int | None]:
    """`tree128.json+lookup8` -> ("tree128.json", 8); a spec without the suffix -> (spec, None)."""
    base, sep, n = spec.rpartition(LOOKUP_SUFFIX)
    if not sep:
        return spec, None
    if not n.isdigit():
        raise TreeError(f"bad tree {spec!r}: write <tree>{LOOKUP_SUFFIX}<nodes>, e.g. tree64{LOOKUP_SUFFIX}8")
    return base, int(n)


def chain(depth: int) -> list[Path_]:
    """Top-1 of each of `depth` heads: the plain speculative chain."""
    return [(0,) * d for d in range(1, depth + 1)]


# ------------------------------------------------------------------ trees inside trees

def nodes_inside(big: Tree, small: Tree) -> tuple[bool, ...] | None:
    """Which of `big`'s nodes (by node id) belong to `small`, when every path of `small` is a
    path of `big`; else None."""
    if not isinstance(big, Tree) or not isinstance(small, Tree):  # a dynamic tree's nodes change every step
        return None
    inside = set(small.paths)
    if not inside <= set(big.paths) or small.lookup > big.lookup:
        return None
    return (True,) + tuple(p in inside for p in big.paths) + tuple(j < small.lookup for j in range(big.lookup))


def accepted_within(path: list[int], inside: tuple[bool, ...]) -> int:
    """Candidates a sub-tree would have accepted in the step that verified its enclosing tree
    and accepted `path` (the accepted node ids after the root, in order); inside: `nodes_inside`.

    Exact for the greedy and the sampling rules: a node is accepted when its candidate equals
    the one target token drawn at its parent, and siblings carry distinct candidates, so the
    compatible nodes form a single chain from the root. A node's candidate depends only on its
    path, so the sub-tree's candidates are the same, and it accepts the part of that chain it
    holds (a prefix: a sub-tree holds the ancestors of its nodes). Typical acceptance may take
    several children of one node, and a lookup chain's first node may repeat a head's guess (two
    compatible branches, the longer kept): there it is a lower bound."""
    n = 0
    for node in path:
        if not inside[node]:
            break
        n += 1
    return n


# ------------------------------------------------------------------ tree search

def expected_accept_length(paths, acc) -> float:
    """Expected accepted tokens per step (the root counts 1) when head d's top-k guess at rank r
    is right with probability acc[d][r], independently: 1 + sum over nodes of the product of
    the accuracies along the node's path (the Medusa paper's estimate)."""
    total = 1.0
    for p in paths:
        prob = 1.0
        for d, r in enumerate(p):
            prob *= acc[d][r]
        total += prob
    return total


def search_tree(acc, num_nodes: int) -> list[Path_]:
    """The tree of `num_nodes` nodes (root included) that maximises expected_accept_length.

    acc: [heads][topk] accuracies (rank r of head d right, given the path so far was right).
    Path probabilities never grow along a path, so taking the most probable frontier node
    each time (best-first) is optimal for this objective."""
    if num_nodes < 1:
        raise TreeError("a tree needs at least the root node")
    K = len(acc)
    chosen: list[Path_] = []
    frontier = [(-acc[0][r], (r,)) for r in range(len(acc[0]))] if K else []
    heapq.heapify(frontier)
    while frontier and len(chosen) < num_nodes - 1:
        neg_p, p = heapq.heappop(frontier)
        chosen.append(p)
        if len(p) < K:
            for r in range(len(acc[len(p)])):
                heapq.heappush(frontier, (neg_p * acc[len(p)][r], p + (r,)))
    return sorted(chosen, key=lambda p: (len(p), p))


def path_counts(ranks: torch.Tensor, topk: int) -> dict[Path_, int]:
    """Observed top-k index paths: ranks [M, K] holds, for each of M positions, the rank of the
    true token in head d's top-k given the true path above it (topk or more: not in the top-k).
    Returns, for every path (r_0, .., r_d), the number of positions whose ranks start with it
    (counted up to each position's first miss)."""
    counts: dict[Path_, int] = {}
    hit = (ranks < topk).long().cumprod(-1).bool()  # [M, K]: heads 0..d all in their top-k
    for d in range(ranks.shape[-1]):
        paths, n = ranks[hit[:, d], : d + 1].unique(dim=0, return_counts=True)
        counts.update({tuple(p): c for p, c in zip(paths.tolist(), n.tolist())})
    return counts


def search_tree_counts(counts: dict[Path_, int], num_nodes: int) -> list[Path_]:
    """The tree of `num_nodes` nodes (root included) that accepts the most tokens on the observed
    positions `counts` (path_counts): a node adds the positions whose true ranks pass through
    it. Unlike search_tree, it uses the heads' joint behaviour (a head's rank given the ranks
    above it), not independent per-rank accuracies. A path holds at most the positions of its
    parent, so best-first is optimal; the frontier only offers children of chosen nodes, so the
    result is a tree whatever the counts."""
    if num_nodes < 1:
        raise TreeError("a tree needs at least the root node")
    children: dict[Path_, list[Path_]] = {}
    for p in counts:
        children.setdefault(p[:-1], []).append(p)
    chosen: list[Path_] = []
    frontier = [(-counts[p], len(p), p) for p in children.get((), [])]
    heapq.heapify(frontier)
    while frontier and len(chosen) < num_nodes - 1:
        _, _, p = heapq.heappop(frontier)
        chosen.append(p)
        for c in children.get(p, []):
            heapq.heappush(frontier, (-counts[c], len(c), c))
    return sorted(chosen, key=lambda p: (len(p), p))


def counted_accept_length(paths, counts: dict[Path_, int], positions: int) -> float:
    """Mean accepted tokens per step (the root counts 1) of a tree on the observed positions:
    a position accepts one token per node of the tree on its true path."""
    return 1.0 + sum(counts.get(tuple(p), 0) for p in paths) / max(positions, 1)


# ------------------------------------------------------------------ named trees and files

DEFAULT_TREE = "tree16"  # the tree of speculation "on" where heads give none of their own
NAMED_TREES = ("ar", "tree2", "tree4", "tree8", "chain", "tree16", "tree32", "tree64")  # small trees: large batches


def load_tree(spec: str | Path | None) -> Tree:
    """A named tree (see NAMED_TREES), a dynamic tree (`dynamic64`, `dynamic64@0.02`: a
    medusa.decoding.dynamic_tree.DynamicTree, chosen per step) or a JSON file
    `{"paths": [[0], [0, 0], ...]}` or `[[0], ...]` (optionally with `"lookup": L`); any may end
    in `+lookup<L>` to add a lookup chain of L nodes."""
    spec = str(spec or "tree32")
    base, lookup = split_lookup(spec)
    if lookup is not None:
        return with_lookup(load_tree(base), lookup)
    if spec == "ar":
        return build_tree([], name="ar")
    dynamic = parse_dynamic(spec)
    if dynamic is not None:
        return dynamic
    if spec in NAMED_TREES:
        text = resources.files("medusa.decoding").joinpath("trees", f"{spec}.json").read_text()
        return _tree_from_json(text, spec)
    p = Path(spec)
    if not p.is_file():
        raise TreeError(f"unknown tree {spec!r}: use one of {', '.join(NAMED_TREES)}, dynamic<N> or a JSON file")
    try:
        return _tree_from_json(p.read_text(), p.stem)
    except OSError as e:
        raise TreeError(f"cannot read tree file {p}: {e}") from None


def _tree_from_json(text: str, name: str) -> Tree:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TreeError(f"tree JSON is malformed: {e}") from None
    lookup = 0
    if isinstance(data, dict):
        name = data.get("name", name)
        lookup = data.get("lookup", 0)
        data = data.get("paths")
    if not isinstance(data, list) or not all(isinstance(p, list) for p in data):
        raise TreeError('tree JSON must be a list of paths or {"paths": [[0], [0, 0], ...]}')
    return build_tree(data, name=name, lookup=lookup)


def prior_accuracies(num_heads: int = 4, topk: int = 10) -> list[list[float]]:
    """A generic accuracy profile for heads not yet measured (top-1 accuracy falling with the
    head's distance, each next rank about a third as likely). The shipped named trees are
    search_tree(prior_accuracies(), n); trained heads ship trees searched on measured accuracies."""
    top1 = [0.6, 0.45, 0.35, 0.28, 0.22, 0.18, 0.15, 0.12]
    return [[top1[min(d, 7)] * 0.35**r for r in range(topk)] for d in range(num_heads)]


def write_named_trees(folder: Path) -> None:
    """Regenerate the named tree files (run `python -m medusa.decoding.tree`)."""
    acc = prior_accuracies()
    trees = {"chain": chain(4), **{f"tree{n}": search_tree(acc, n) for n in (2, 4, 8, 16, 32, 64)}}
    for name, paths in trees.items():
        (folder / f"{name}.json").write_text(build_tree(paths, name).to_json() + "\n")


if __name__ == "__main__":
    write_named_trees(Path(__file__).parent / "trees")
