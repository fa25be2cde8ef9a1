"""Medusa-1 heads: K independent heads, each L residual blocks `x + SiLU(W x)` (W zero-
initialised, so an untrained head starts as the base LM head) followed by an LM head (the base
model's, shared and frozen, by default). Head i reads h_t and guesses token t+2+i."""
from __future__ import annotations

import torch
from torch import nn

from medusa.heads.base import DraftHeads, HeadsConfig
from medusa.kernels.draft import add_silu


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return add_silu(x, self.linear(x))  # x + SiLU(W x), one kernel on a GPU


class MedusaHeads(DraftHeads):
    def __init__(self, config: HeadsConfig, base_lm_head: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.blocks = nn.ModuleList(nn.Sequential(*[ResBlock(D) for _ in range(config.num_layers)]) for _ in range(config.num_heads))
        self._init_lm_heads(base_lm_head)

    def head_logits(self, hidden: torch.Tensor, base) -> torch.Tensor:
        """hidden [..., D] -> [..., K, V]."""
        return torch.stack([self.lm_logits(i, block(hidden), base) for i, block in enumerate(self.blocks)], dim=-2)

    def propose(self, state, last_hidden, root, tree, base) -> torch.Tensor:
        B = root.shape[0]
        if tree.num_nodes == 1:
            return root[:, None]
        K = tree.max_depth
        z = torch.stack([self.blocks[i](last_hidden) for i in range(K)], dim=1)  # [B, K, D]
        top = self.draft_topk_each(z, base, tree.topk)  # [B, K, topk]: one LM-head GEMM and one top-k
        head, rank = tree.head.to(root.device), tree.rank.to(root.device)
        cand = top[:, head.clamp_min(0), rank]  # [B, N]
        cand[:, 0] = root
        return cand

    def draft_children(self, state, last_hidden, level, chains, k, base):
        """Head `level` reads only the last hidden state: one top-k shared by every node of the
        level (a node's children do not depend on its path) -> [B, 1, k] twice."""
        ids, logp = self.draft_topk_logp(level, self.blocks[level](last_hidden), base, k)  # [B, k]
        return ids[:, None], logp[:, None]

    def forward(self, hidden, base):
        return self.head_logits(hidden, base)
