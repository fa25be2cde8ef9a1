"""Head accuracy on held-out distilled data: for every head, how often the token it must guess
is among its top-1 .. top-k (Hydra heads under teacher forcing, i.e. given that the path above
the guess is right, which is what the tree's acceptance needs), and the tree search on those
numbers. Knows nothing of files or the CLI."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medusa.decoding.tree import Path_, counted_accept_length, expected_accept_length, path_counts, search_tree, search_tree_counts
from medusa.training.data import Record, iterate_batches, plan_batches
from medusa.training.features import base_hidden, head_features, head_targets


@dataclass(frozen=True)
class HeadAccuracy:
    topk: list[list[float]]  # [K][k]: P(target in head i's top-(r+1))
    tokens: int  # positions scored per head (head 0; later heads see slightly fewer)
    paths: dict[Path_, int] | None = None  # tree.path_counts over the `tokens` positions of head 0

    @property
    def rank(self) -> list[list[float]]:
        """[K][k]: P(target is exactly head i's rank-r guess): what the tree search needs."""
        return [[row[0]] + [row[r] - row[r - 1] for r in range(1, len(row))] for row in self.topk]

    def to_dict(self) -> dict:
        d = {"tokens": self.tokens, "topk": self.topk, "rank": self.rank}
        if self.paths is not None:  # paths seen once are dropped: no tree worth searching holds them
            d["path_counts"] = {",".join(map(str, p)): n for p, n in sorted(self.paths.items()) if n >= MIN_PATH_COUNT}
        return d


MIN_PATH_COUNT = 2


def true_rank(top: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of each target in its row of top-k ids: top [M, k], target [M] -> [M] long
    (k where the target is not among them)."""
    match = top == target[:, None]
    return torch.where(match.any(-1), match.long().argmax(-1), top.shape[-1])


@torch.no_grad()
def head_accuracy(heads, base, records: list[Record], *, topk: int = 10, max_tokens: int = 16384, max_len: int = 1024,
                  max_batches: int | None = None, progress: Callable[[int], None] | None = None) -> HeadAccuracy:
    K = heads.config.num_heads
    hits = torch.zeros(K, topk, dtype=torch.long, device=base.device)
    rows = torch.zeros(K, dtype=torch.long, device=base.device)
    paths: dict[Path_, int] = {}
    plan = plan_batches(records, max_tokens, max_len, seed=0, epoch=0)[:max_batches]
    autocast = base.dtype != torch.float32
    for b in iterate_batches(records, plan, max_len):
        tokens, mask = b.tokens.to(base.device), b.target_mask.to(base.device)
        hidden = base_hidden(base, tokens)
        with torch.autocast(base.device.type, dtype=torch.bfloat16, enabled=autocast):
            feats = head_features(heads, base, tokens, hidden)
            _, start = head_targets(tokens, mask, 0)  # [B, T]: the positions a step may start at
            ranks = torch.full((int(start.sum()), K), topk, dtype=torch.long, device=base.device)  # topk: a miss
            for i, z in enumerate(feats):
                targets, valid = head_targets(tokens, mask, i)
                top = heads.draft_topk(i, z[valid], base, topk)  # [M, k] (within the draft vocabulary, as decoding)
                rank = true_rank(top, targets[valid])  # [M]
                hits[i] += torch.bincount(rank, minlength=topk + 1)[:topk].cumsum(0)  # [k]: in top-(r+1)
                rows[i] += rank.shape[0]
                # the rank per start position (head i's valid positions are among head 0's)
                ranks[:, i] = torch.full_like(start, topk, dtype=torch.long).masked_scatter(valid, rank)[start]
        for p, n in path_counts(ranks.cpu(), topk).items():
            paths[p] = paths.get(p, 0) + n
        if progress:
            progress(1)
    acc = (hits.double() / rows.clamp_min(1)[:, None].double()).tolist()
    return HeadAccuracy([[round(a, 6) for a in row] for row in acc], int(rows[0]), paths)


@dataclass(frozen=True)
class SearchedTree:
    nodes: int
    paths: list[tuple[int, ...]]
    expected_accept_length: float  # under independent per-rank accuracies (tree.expected_accept_length)
    counted_accept_length: float | None = None  # on the observed positions (tree.counted_accept_length)


def trees_for_budgets(rank_acc: list[list[float]], budgets: list[int], counts: dict[Path_, int] | None = None,
                      positions: int = 0) -> list[SearchedTree]:
    """The best tree per node budget (root included): searched on the observed paths `counts`
    over `positions` positions when given (tree.search_tree_counts), else on the rank table."""
    out = []
    for n in budgets:
        paths = search_tree_counts(counts, n) if counts else search_tree(rank_acc, n)
        counted = counted_accept_length(paths, counts, positions) if counts else None
        out.append(SearchedTree(len(paths) + 1, paths, expected_accept_length(paths, rank_acc), counted))
    return out
