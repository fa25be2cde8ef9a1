"""Hydra and Hydra++ heads: sequentially dependent draft heads.

Head i at position t reads a summary s_t of the sequence so far together with the input
embeddings of tokens t+1 .. t+1+i (the tokens on its tree path) and guesses token t+2+i:

    z_i = s_t + SiLU(W_i [s_t; e(x_t+1); ...; e(x_t+1+i)])     # W_i zero-initialised
    z_i = ResBlock(... ResBlock(z_i))                          # num_layers - 1 blocks
    logits_i = lm_head(z_i)                                     # the base's, shared by default

- "hydra":   s_t = h_t, the base model's final hidden state at t.
- "hydra++": s_t = the output of one extra decoder layer (the "prefix attention" layer, a
  Llama block with its own small KV cache) run causally over the base hidden states h_0..h_t.
  At inference its KV lives in an explicit HydraState, written by `observe` as tokens commit.

An untrained head (all W zero, prefix-layer output projections zero) is the base LM head at t.
This module knows nothing of acceptance, the base model's KV cache or training losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medusa.heads.base import DraftHeads, HeadsConfig
from medusa.heads.medusa import ResBlock
from medusa.kernels.draft import add_silu, head_inputs
from medusa.kernels.topk import Into, into_plan
from medusa.model.config import ModelConfig
from medusa.model.kv_cache import KVCache
from medusa.model.llama import Block


class HydraHead(nn.Module):
    """One head, conditioned on `n_cond` path embeddings."""

    def __init__(self, dim: int, n_cond: int, num_layers: int):
        super().__init__()
        self.cond = nn.Linear(dim * (n_cond + 1), dim)
        nn.init.zeros_(self.cond.weight)
        nn.init.zeros_(self.cond.bias)
        self.blocks = nn.Sequential(*[ResBlock(dim) for _ in range(max(num_layers - 1, 0))])

    def forward(self, s: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """s [..., D], embeds [..., n_cond, D] -> [..., D]."""
        return self.from_inputs(s, torch.cat([s, embeds.flatten(-2)], dim=-1))

    def from_inputs(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The same from the concatenated input x = [s; e_1; ...] [..., (n_cond + 1) D]; s may
        broadcast over x's rows (one summary for every parent of a tree level)."""
        return self.blocks(add_silu(s, self.cond(x)))


@dataclass
class HydraState:
    """Hydra++ per-request state: the prefix layer's KV (one layer; the last slot is a scratch
    slot that padded entries write to) and its output at the last committed token."""

    cache: KVCache  # k, v [1, B, kv_heads, max_len + 1, head_dim]
    last: torch.Tensor  # [B, D] prefix-layer output at the last committed token
    rope_cos: torch.Tensor  # [P, Dh] the base model's RoPE tables (float32)
    rope_sin: torch.Tensor

    @property
    def scratch_slot(self) -> int:
        return self.cache.max_len - 1

    # per-row state (medusa.decoding.kv_pool.PerRow): the cache and `last` hold one row per
    # request; the RoPE tables are the base model's, shared by every row
    def rows(self, lo: int, hi: int) -> "HydraState":
        return HydraState(self.cache.rows(lo, hi), self.last[lo:hi], self.rope_cos, self.rope_sin)

    def swap_rows(self, a: int, b: int) -> None:
        self.cache.swap_rows(a, b)
        self.last[[a, b]] = self.last[[b, a]]

    def scratch(self) -> "HydraState":
        return HydraState(self.cache, self.last.clone(), self.rope_cos, self.rope_sin)

    def write_back(self, view: "HydraState", lo: int, hi: int) -> None:
        self.cache.write_back(view.cache, lo, hi)
        if view.last.data_ptr() != self.last[lo:hi].data_ptr():
            self.last[lo:hi] = view.last

    def copy_prefix(self, src: "HydraState", k: int, T: int) -> None:
        self.cache.copy_prefix(src.cache, k, T)
        self.last[:k].copy_(src.last[:k])


@dataclass(frozen=True)
class _Level:
    """The nodes of one tree depth d and how their tokens are proposed by head d-1."""

    head: int
    chains: torch.Tensor  # [P, d] node ids from the root to each of the P nodes at depth d-1 that have children
    topk: int  # guesses taken per parent
    into: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # medusa.kernels.topk.into_plan: the node of each parent's j-th guess


def _levels(tree, device) -> tuple[_Level, ...]:
    parent, depth, rank = tree.parent.tolist(), tree.depth.tolist(), tree.rank.tolist()
    levels = []
    for d in range(1, tree.max_depth + 1):
        children = [n for n in range(tree.num_nodes) if depth[n] == d]
        parents = sorted({parent[c] for c in children})
        chains = []
        for p in parents:
            chain = [p]
            while chain[0] != 0:
                chain.insert(0, parent[chain[0]])
            chains.append(chain)
        pidx = {p: i for i, p in enumerate(parents)}
        k = 1 + max(rank[c] for c in children)
        dest = [[-1] * k for _ in parents]  # [P, k]: -1 where the tree keeps no node for that guess
        for c in children:
            dest[pidx[parent[c]]][rank[c]] = c
        levels.append(_Level(d - 1, torch.tensor(chains, dtype=torch.long, device=device), k, into_plan(dest, device)))
    return tuple(levels)


def prefix_config(config: HeadsConfig) -> ModelConfig:
    """The Llama-block shape of the Hydra++ prefix layer, from config.extra["prefix"]."""
    p = config.extra["prefix"]
    return ModelConfig(arch="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=int(p["intermediate_size"]), num_layers=1, num_heads=int(p["num_heads"]),
                       num_kv_heads=int(p["num_kv_heads"]), head_dim=int(p["head_dim"]),
                       rms_norm_eps=float(p.get("rms_norm_eps", 1e-5)))


def prefix_extra(base, intermediate_size: int | None = None) -> dict:
    """config.extra for a Hydra++ prefix layer shaped like one of `base`'s layers."""
    c = base.cfg
    return {"prefix": {"intermediate_size": int(intermediate_size or c.intermediate_size), "num_heads": c.num_heads,
                       "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps}}


class HydraHeads(DraftHeads):
    def __init__(self, config: HeadsConfig, base_lm_head: torch.Tensor | None = None):
        super().__init__()
        if config.head_type not in ("hydra", "hydra++"):
            raise ValueError(f"HydraHeads serves hydra and hydra++, not {config.head_type!r}")
        self.config = config
        D, K = config.hidden_size, config.num_heads
        self.heads = nn.ModuleList(HydraHead(D, i + 1, config.num_layers) for i in range(K))
        self.prefix = None
        if config.head_type == "hydra++":
            self.prefix = Block(prefix_config(config))
            for lin in (self.prefix.self_attn.o_proj, self.prefix.mlp.down_proj):
                nn.init.zeros_(lin.weight)  # the untrained layer passes h through unchanged
        self._init_lm_heads(base_lm_head)
        self._plans: dict = {}

    # ------------------------------------------------------------------ shared pieces

    def _prefix(self, hidden, positions, cache: KVCache, slots, mask, cos_t, sin_t) -> torch.Tensor:
        """Run the prefix layer. hidden [B, A, D], positions/slots [B, A], mask [B, A, S]."""
        inp = self.prefix.self_attn.inputs(hidden.dtype, cos_t, sin_t, positions, slots, mask)
        return self.prefix(hidden, inp, 0, cache)  # [B, A, D]

    def summary(self, hidden: torch.Tensor, base) -> torch.Tensor:
        """Teacher-forcing summaries s_t over whole sequences: hidden [B, T, D] -> [B, T, D]
        (Hydra: h itself; Hydra++: the prefix layer run causally, no state kept)."""
        if self.prefix is None:
            return hidden
        B, T, _ = hidden.shape
        pos = torch.arange(T, device=hidden.device)[None].expand(B, T)
        cache = KVCache.allocate(prefix_config(self.config), B, T, hidden.dtype, hidden.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()[None].expand(B, T, T)
        return self._prefix(hidden, pos, cache, pos, causal, base.rope_cos, base.rope_sin)

    def head_hidden(self, i: int, s: torch.Tensor, path_embeds: torch.Tensor) -> torch.Tensor:
        """s [..., D], path_embeds [..., i+1, D] (tokens t+1 .. t+1+i) -> z_i [..., D]."""
        return self.heads[i](s, path_embeds)

    # ------------------------------------------------------------------ DraftHeads contract

    def new_state(self, batch: int, max_len: int, base):
        if self.prefix is None:
            return None
        p = self.prefix.self_attn.k_proj.weight
        cache = KVCache.allocate(prefix_config(self.config), batch, max_len + 1, p.dtype, p.device)
        last = torch.zeros(batch, self.config.hidden_size, dtype=p.dtype, device=p.device)
        return HydraState(cache, last, base.rope_cos, base.rope_sin)

    def observe(self, state, hidden, positions, count, kv_len: int | None = None) -> None:
        if self.prefix is None:
            return
        B, A, _ = hidden.shape
        dev = hidden.device
        j = torch.arange(A, device=dev)
        valid = j[None] < count[:, None]  # [B, A]
        slots = torch.where(valid, positions, torch.full_like(positions, state.scratch_slot))  # [B, A]
        # attend over the slots up to kv_len only (every position is below it), not the whole cache
        S = state.scratch_slot if kv_len is None else min(kv_len, state.scratch_slot)
        s = torch.arange(S, device=dev)
        mask = s[None, None] <= positions[:, :, None]  # [B, A, S]
        out = self._prefix(hidden.to(state.last.dtype), positions, state.cache, slots, mask, state.rope_cos, state.rope_sin)
        last = (count - 1).clamp(0, A - 1)  # [B]
        picked = out[torch.arange(B, device=dev), last]  # [B, D]
        state.last.copy_(torch.where((count > 0)[:, None], picked, state.last))  # in place: the state may be a view

    def observe_tree(self, state, hidden, inputs):
        """The prefix layer over every tree node, as one more layer of the verification forward:
        it reuses that forward's RoPE tables, slots and tree mask (built once per step), and
        writes its K/V at the nodes' slots of its own cache. A node sees the committed tokens and
        its ancestors, so on the accepted path this is what `observe` computes over the accepted
        tokens alone, without a second forward's inputs, mask and launches. None (use `observe`)
        where the layer's shape or dtype differs from the base layers' that built `inputs`."""
        if self.prefix is None or inputs is None or torch.is_grad_enabled():
            return None
        attn = self.prefix.self_attn
        if inputs.cos.shape[-2:] != (attn.n_heads + 2 * attn.n_kv, attn.head_dim) or inputs.cos.dtype != state.last.dtype:
            return None
        return self.prefix(hidden.to(state.last.dtype), inputs, 0, state.cache)  # [B, N, D]

    def commit_tree(self, state, seen, src, dst, last_node) -> None:
        state.cache.commit_path(src, dst)
        rows = torch.arange(seen.shape[0], device=seen.device)
        state.last.copy_(seen[rows, last_node])  # in place: the state may be a view

    def propose(self, state, last_hidden, root, tree, base) -> torch.Tensor:
        B, N = root.shape[0], tree.num_nodes
        if N == 1:
            return root[:, None]
        key = (tree.paths, str(root.device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _levels(tree, root.device)
        s = state.last if self.prefix is not None else last_hidden  # [B, D]
        weight = base.embed_tokens.weight  # [V, D]
        cand = torch.empty(B, N, dtype=torch.long, device=root.device)
        cand[:, 0] = root
        for lv in plan:
            x = head_inputs(s, cand, lv.chains, weight)  # [B, P, (d + 1) D]: s, then the path's embeddings
            z = self.heads[lv.head].from_inputs(s[:, None].to(weight.dtype), x)  # [B, P, D]
            self.draft_topk(lv.head, z, base, lv.topk, into=Into(cand, *lv.into))  # the level's nodes of cand
        return cand
