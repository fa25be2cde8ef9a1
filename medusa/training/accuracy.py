"""Head accuracy on held-out distilled data: for every head, how often the token it must guess
is among its top-1 .. top-k (Hydra heads under teacher forcing, i.e. given that the path above
the guess is right, which is what the tree's acceptance needs), and the tree search on those
numbers. Knows nothing of files or the CLI."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medusa.decoding.tree import expected_accept_length, search_tree
from medusa.training.data import Record, iterate_batches, plan_batches
from medusa.training.features import base_hidden, head_features, head_targets


@dataclass(frozen=True)
class HeadAccuracy:
    topk: list[list[float]]  # [K][k]: P(target in head i's top-(r+1))
    tokens: int  # positions scored per head (head 0; later heads see slightly fewer)

    @property
    def rank(self) -> list[list[float]]:
        """[K][k]: P(target is exactly head i's rank-r guess): what the tree search needs."""
        return [[row[0]] + [row[r] - row[r - 1] for r in range(1, len(row))] for row in self.topk]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "topk": self.topk, "rank": self.rank}


@torch.no_grad()
def head_accuracy(heads, base, records: list[Record], *, topk: int = 10, max_tokens: int = 16384, max_len: int = 1024,
                  max_batches: int | None = None, progress: Callable[[int], None] | None = None) -> HeadAccuracy:
    K = heads.config.num_heads
    hits = torch.zeros(K, topk, dtype=torch.long, device=base.device)
    rows = torch.zeros(K, dtype=torch.long, device=base.device)
    plan = plan_batches(records, max_tokens, max_len, seed=0, epoch=0)[:max_batches]
    autocast = base.dtype != torch.float32
    for b in iterate_batches(records, plan, max_len):
        tokens, mask = b.tokens.to(base.device), b.target_mask.to(base.device)
        hidden = base_hidden(base, tokens)
        with torch.autocast(base.device.type, dtype=torch.bfloat16, enabled=autocast):
            feats = head_features(heads, base, tokens, hidden)
            for i, z in enumerate(feats):
                targets, valid = head_targets(tokens, mask, i)
                top = heads.draft_topk(i, z[valid], base, topk)  # [M, k] (within the draft vocabulary, as decoding)
                first = (top == targets[valid][:, None]).long().cumsum(-1).clamp_max(1)  # [M, k] in top-(r+1)
                hits[i] += first.sum(0)
                rows[i] += first.shape[0]
        if progress:
            progress(1)
    acc = (hits.double() / rows.clamp_min(1)[:, None].double()).tolist()
    return HeadAccuracy([[round(a, 6) for a in row] for row in acc], int(rows[0]))


@dataclass(frozen=True)
class SearchedTree:
    nodes: int
    paths: list[tuple[int, ...]]
    expected_accept_length: float


def trees_for_budgets(rank_acc: list[list[float]], budgets: list[int]) -> list[SearchedTree]:
    """The best tree per node budget (root included) and its expected accepted length."""
    out = []
    for n in budgets:
        paths = search_tree(rank_acc, n)
        out.append(SearchedTree(len(paths) + 1, paths, expected_accept_length(paths, rank_acc)))
    return out
