"""Dynamic trees: per step and per row, the tree of at most N nodes that the draft heads' own
confidences rank highest (EAGLE-2's dynamic draft tree), built on the device inside the step.

A static tree (tree.py) fixes which top-k ranks of which heads are verified, from the heads'
average accuracies. A dynamic tree decides per row and per step:

  1. expand: depth 1 is the root's k best children (head 0's top-k). At each next depth the
     W most probable nodes of the depth just drafted (the beam, W = k) are expanded into their
     k best children each, with path probability = parent's x the head's probability of the
     child's token. That is D heads' worth of drafting, over a pool of
     M = k + (D - 1) W k candidate nodes per row.
  2. rerank: the N - 1 pool nodes of highest path probability are kept (a child is never more
     probable than its parent, so the kept set holds the ancestors of each of its nodes: a tree).
  3. prune (optional threshold p): kept nodes whose path probability is under p stay in the
     tree's fixed shape but are never accepted (their root-to-node path is cut to the root).

What "the head's probability of a child" means depends on the head family (`DraftHeads.
draft_children`): Hydra/Hydra++ heads condition on the path, so each expanded node gets its own
head pass over its path (as the static tree's levels do for their parents); Medusa-1 heads see
only the last hidden state, so every node at depth d gets head d-1's one top-k, and path
probability is the product of the heads' independent confidences along the path.

Everything has fixed shapes (N, k, W, D known on the host), no data-dependent control flow and no
host synchronisation, so the step stays capturable in a CUDA graph. The result (`RowTrees`) holds
per row what a static Tree holds for all rows: node tokens, parents, depths, the ancestor mask and
one root-to-node path per node for verification (P = N paths; the longest accepted path is the
same as over leaves only). Sibling nodes carry distinct tokens (one top-k each), so the lossless
sampling rule stays exact, and the draft is a deterministic function of the prefix.

Spec grammar: `dynamic<N>[x<k>][d<D>][@<p>][+lookup<L>]`, e.g. dynamic64, dynamic64@0.02,
dynamic32x8d3, dynamic64+lookup16. D defaults to the heads' count (`bind`)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from medusa.errors import TreeError

DEFAULT_TOPK = 10  # children per expanded node and nodes expanded per depth (EAGLE-2's top-k and beam)
MAX_NODES = 256
_SPEC = re.compile(r"dynamic(\d+)(?:x(\d+))?(?:d(\d+))?(?:@(\d*\.?\d+(?:[eE]-?\d+)?))?")
_FLOOR = -1e4  # log-probabilities are clamped to [_FLOOR, 0]: finite, never growing along a path


@dataclass(frozen=True)
class DynamicTree:
    """The spec of a dynamic tree (what a static Tree is to the engine: a name, a node count,
    a depth); the nodes themselves are chosen per row inside each step (`grow`)."""

    nodes: int  # N: the heads' nodes per row, root included
    depth: torch.Tensor  # [N + L] long: uniforms column j carries the draw for depth min(j, accept_depth)
    topk: int = DEFAULT_TOPK  # k: children per expanded node (and W: nodes expanded per depth)
    depth_limit: int = 0  # D: how deep the heads draft (0: unbound, as deep as the heads guess: `bind`)
    threshold: float = 0.0  # p: nodes of path probability under p are never accepted
    lookup: int = 0  # L: a prompt-lookup chain appended from the root (as Tree.lookup)
    name: str = "dynamic"

    paths = ()  # no fixed paths (graph keys, policy tables: the name stands for the tree)

    @property
    def num_nodes(self) -> int:
        return self.nodes + self.lookup

    @property
    def head_nodes(self) -> int:
        return self.nodes

    @property
    def max_depth(self) -> int:
        return self.depth_limit

    @property
    def accept_depth(self) -> int:
        return max(self.depth_limit, self.lookup)

    @cached_property
    def heads_only(self) -> "DynamicTree":
        if not self.lookup:
            return self
        return dynamic_tree(self.nodes, self.topk, self.depth_limit, self.threshold, 0,
                            name=self.name.split("+lookup")[0]).to(self.depth.device)

    def bind(self, num_heads: int) -> "DynamicTree":
        """This tree for heads guessing num_heads tokens ahead: an unbound depth becomes
        min(num_heads, N - 1); an explicit one deeper than the heads is a TreeError."""
        if self.depth_limit > num_heads:
            raise TreeError(f"tree {self.name} is {self.depth_limit} deep but the heads guess only {num_heads} tokens ahead")
        if self.depth_limit:
            return self
        return dynamic_tree(self.nodes, self.topk, min(num_heads, self.nodes - 1), self.threshold, self.lookup,
                            name=self.name).to(self.depth.device)

    def to(self, device) -> "DynamicTree":
        return dataclasses.replace(self, depth=self.depth.to(device))

    def to_json(self) -> str:
        raise TreeError(f"tree {self.name} is chosen per step: it has no fixed paths to write")


def dynamic_tree(nodes: int, topk: int = DEFAULT_TOPK, depth: int = 0, threshold: float = 0.0, lookup: int = 0,
                 name: str | None = None) -> DynamicTree:
    """A validated DynamicTree; name: canonical from the parameters unless given."""
    from medusa.decoding.tree import LOOKUP_SUFFIX, MAX_LOOKUP

    if not 2 <= nodes <= MAX_NODES:
        raise TreeError(f"a dynamic tree holds 2 to {MAX_NODES} nodes, got {nodes}")
    if topk < 1:
        raise TreeError(f"a dynamic tree drafts at least 1 child per node, got {topk}")
    if depth < 0 or depth >= nodes:
        raise TreeError(f"a dynamic tree of {nodes} nodes is at most {nodes - 1} deep, got {depth}")
    if not (0.0 <= threshold < 1.0):
        raise TreeError(f"a pruning threshold is a path probability in [0, 1), got {threshold}")
    if not 0 <= lookup <= MAX_LOOKUP:
        raise TreeError(f"a lookup chain holds 0 to {MAX_LOOKUP} nodes, got {lookup!r}")
    if name is None:
        name = (f"dynamic{nodes}" + (f"x{topk}" if topk != DEFAULT_TOPK else "") + (f"d{depth}" if depth else "")
                + (f"@{threshold:g}" if threshold else ""))
    base = name.split(LOOKUP_SUFFIX)[0]
    name = f"{base}{LOOKUP_SUFFIX}{lookup}" if lookup else base
    n = nodes + lookup
    cap = max(depth, lookup) if depth else n - 1
    return DynamicTree(nodes, torch.arange(n).clamp_max(cap), topk, depth, threshold, lookup, name)


def parse_dynamic(spec: str) -> DynamicTree | None:
    """`dynamic64`, `dynamic32x8d3@0.05` -> a DynamicTree (no lookup suffix here: tree.load_tree
    splits it off); None when spec is not a dynamic tree's name; TreeError when malformed."""
    if not spec.startswith("dynamic"):
        return None
    m = _SPEC.fullmatch(spec)
    if m is None:
        if not spec[len("dynamic"):][:1].isdigit():
            return None  # a file's name, say
        raise TreeError(f"bad dynamic tree {spec!r}: write dynamic<N>[x<k>][d<depth>][@<p>], e.g. dynamic64 or dynamic64@0.02")
    n, k, d, p = m.groups()
    return dynamic_tree(int(n), int(k) if k else DEFAULT_TOPK, int(d) if d else 0, float(p) if p else 0.0)


def is_dynamic(tree) -> bool:
    return isinstance(tree, DynamicTree)


BUDGETS = (2, 4, 8, 16, 32, 64)  # the node budgets an engine offers its policy below a dynamic default tree


def smaller_budgets(tree: DynamicTree) -> list[DynamicTree]:
    """The dynamic trees of the same kind (k, threshold; no lookup chain) with fewer nodes: what
    the engine's load-adaptive policy may shrink `tree` to in large batches, as it picks among
    the named static trees below a static default tree."""
    return [dynamic_tree(n, tree.topk, min(tree.depth_limit, n - 1), tree.threshold) for n in BUDGETS if n < tree.nodes]


# ------------------------------------------------------------------ the per-row trees


@dataclass(frozen=True)
class RowTrees:
    """B trees of N nodes each (node 0 the root; a node's parent comes before it)."""

    tokens: torch.Tensor  # [B, N] long: candidate token of each node (root: the chosen token)
    parent: torch.Tensor  # [B, N] long: parent node (root: 0)
    depth: torch.Tensor  # [B, N] long: position offset from the root
    mask: torch.Tensor  # [B, N, N] bool: node i may attend to node j (j is i or an ancestor)
    retrieve: torch.Tensor  # [B, N, D+1] long: node ids from the root to each node (-1 padded; pruned: root only)
    valid: torch.Tensor  # [B, N] bool: the node may be accepted (not pruned, not padding)


# children(level, chains [B, W, level + 1] tokens root..parent) -> tokens [B, W or 1, k], logp [B, W or 1, k]
Children = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def grow(children: Children, root: torch.Tensor, nodes: int, depth: int, topk: int,
         threshold: float = 0.0) -> RowTrees:
    """The dynamic tree of each row: expand (beam of width k per depth), rerank, keep the best
    nodes - 1 nodes, prune under threshold. root [B]; children: the heads' top-k and
    log-probabilities of the children of W nodes at depth `level` given their paths (W == 1 at
    level 0; a result with W == 1 at a later level is shared by every node of the level).
    k is the number of children the callback returns (the caller's min(topk, draft vocabulary))."""
    B, dev = root.shape[0], root.device
    chains = root[:, None, None]  # [B, 1, 1]
    beam_lp = torch.zeros(B, 1, device=dev, dtype=torch.float64)  # [B, W]: path log-probabilities
    beam_at = torch.full((B, 1), -1, dtype=torch.long, device=dev)  # [B, W]: pool index (-1: root)
    pool_tok, pool_lp, pool_par, pool_depth = [], [], [], []
    offset = 0
    for level in range(depth):
        tok, lp = children(level, chains)  # [B, W' in (1, W), k]
        W = chains.shape[1]
        k = tok.shape[-1]
        tok = tok.expand(B, W, k)
        lp = lp.to(torch.float64).clamp(_FLOOR, 0.0).expand(B, W, k)
        cum = (beam_lp[..., None] + lp).reshape(B, W * k)  # [B, W k]
        pool_tok.append(tok.reshape(B, W * k))
        pool_lp.append(cum)
        pool_par.append(beam_at[..., None].expand(B, W, k).reshape(B, W * k))
        pool_depth.append(level + 1)
        if level + 1 < depth:  # the next beam: the most probable of this level's nodes
            width = min(topk, W * k)
            beam_lp, pick = cum.topk(width, dim=-1)  # [B, W]
            beam_at = offset + pick
            parent_chain = chains.gather(1, (pick // k)[..., None].expand(B, width, chains.shape[-1]))
            chains = torch.cat([parent_chain, pool_tok[-1].gather(1, pick)[..., None]], dim=-1)  # [B, W, level + 2]
        offset += W * k
    sizes = [t.shape[1] for t in pool_tok]
    tok = torch.cat(pool_tok, 1)  # [B, M]
    lp = torch.cat(pool_lp, 1)
    par = torch.cat(pool_par, 1)
    dep = torch.cat([torch.full((s,), d, dtype=torch.long, device=dev) for s, d in zip(sizes, pool_depth)])  # [M]
    M, n = tok.shape[1], nodes - 1
    if M < n:  # fewer candidates than room: pad with never-accepted children of the root
        pad = n - M
        tok = torch.cat([tok, root[:, None].expand(B, pad)], 1)
        lp = torch.cat([lp, torch.full((B, pad), -math.inf, dtype=lp.dtype, device=dev)], 1)
        par = torch.cat([par, torch.full((B, pad), -1, dtype=torch.long, device=dev)], 1)
        dep = torch.cat([dep, torch.ones(pad, dtype=torch.long, device=dev)])
    return select(tok, lp, par, dep, root, nodes, depth, threshold)


def select(tok: torch.Tensor, lp: torch.Tensor, par: torch.Tensor, dep: torch.Tensor, root: torch.Tensor,
           nodes: int, depth: int, threshold: float = 0.0) -> RowTrees:
    """Keep the best nodes - 1 of a candidate pool and lay them out as trees. tok / lp / par
    [B, M]: token, path log-probability (float64), parent pool index (-1: the root) of each
    candidate; dep [M] its depth. Candidates are in depth order, parents before children.
    Ties go to the shallower node, then the lower pool index, so that a parent always ranks
    before its child (a child's log-probability is its parent's plus one <= 0)."""
    B, M = tok.shape
    n, dev = nodes - 1, tok.device
    key = lp - dep.to(lp.dtype) * 1e-9  # [B, M]: strictly below the parent's key
    kept = key.topk(n, dim=-1).indices.sort(dim=-1).values  # [B, n]: pool indices in depth order
    node_of = torch.zeros(B, M + 1, dtype=torch.long, device=dev)  # pool index + 1 -> node id (0: root)
    node_of.scatter_(1, kept + 1, torch.arange(1, n + 1, device=dev).expand(B, n))
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    tokens = torch.cat([root[:, None], tok.gather(1, kept)], 1)  # [B, N]
    parent = torch.cat([zero, node_of.gather(1, par.gather(1, kept) + 1)], 1)  # [B, N]
    node_depth = torch.cat([zero, dep[kept]], 1)  # [B, N]
    path_lp = torch.cat([torch.zeros(B, 1, dtype=lp.dtype, device=dev), lp.gather(1, kept)], 1)
    valid = path_lp >= (math.log(threshold) if threshold > 0 else -math.inf)
    valid &= path_lp > -math.inf  # padding
    mask, retrieve = ancestry(parent, node_depth, depth)
    root_only = torch.full_like(retrieve, -1)
    root_only[..., 0] = 0
    retrieve = torch.where(valid[..., None], retrieve, root_only)
    return RowTrees(tokens, parent, node_depth, mask, retrieve, valid)


def ancestry(parent: torch.Tensor, depth: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """parent, depth [B, N] (trees of at most max_depth) -> the ancestor mask [B, N, N] (a node
    and its ancestors) and each node's root-to-node path [B, N, max_depth + 1] (-1 padded), in
    max_depth + 1 fixed rounds of gathers."""
    B, N = parent.shape
    dev = parent.device
    eye = torch.eye(N, dtype=torch.bool, device=dev).expand(B, N, N)
    mask = eye
    for _ in range(max_depth):
        mask = eye | mask.gather(1, parent[..., None].expand(B, N, N))  # own row | the parent's
    path = torch.full((B, N, max_depth + 1), -1, dtype=torch.long, device=dev)
    cur = torch.arange(N, device=dev).expand(B, N)  # [B, N]: an ancestor of each node, walking up
    for _ in range(max_depth + 1):
        path.scatter_(2, depth.gather(1, cur)[..., None], cur[..., None])
        cur = parent.gather(1, cur)
    return mask, path


def with_chain(trees: RowTrees, chain: torch.Tensor, width: int) -> RowTrees:
    """trees with a lookup chain from the root appended: chain [B, L] tokens, as Tree.lookup's
    nodes N .. N+L-1 (each attending to the root and the chain above it); retrieve widened to
    width columns and one more path (the chain) added."""
    B, N = trees.tokens.shape
    L = chain.shape[1]
    dev = chain.device
    ids = torch.arange(N, N + L, device=dev)
    parent = torch.cat([trees.parent, torch.cat([torch.zeros(1, dtype=torch.long, device=dev), ids[:-1]]).expand(B, L)], 1)
    depth = torch.cat([trees.depth, torch.arange(1, L + 1, device=dev).expand(B, L)], 1)
    m = N + L
    mask = torch.zeros(B, m, m, dtype=torch.bool, device=dev)
    mask[:, :N, :N] = trees.mask
    mask[:, N:, 0] = True
    mask[:, N:, N:] = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    ret = torch.nn.functional.pad(trees.retrieve, (0, width - trees.retrieve.shape[-1]), value=-1)
    lane = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), ids,
                      torch.full((width - 1 - L,), -1, dtype=torch.long, device=dev)])
    ret = torch.cat([ret, lane.expand(B, 1, width)], 1)
    valid = torch.cat([trees.valid, torch.ones(B, L, dtype=torch.bool, device=dev)], 1)
    return RowTrees(torch.cat([trees.tokens, chain], 1), parent, depth, mask, ret, valid)
