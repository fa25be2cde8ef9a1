"""Hydra and Hydra++ heads: sequentially dependent draft heads.

Head i at position t reads a summary s_t of the sequence so far together with the input
embeddings of tokens t+1 .. t+1+i (the tokens on its tree path) and guesses token t+2+i:

    z_i = s_t + SiLU(W_i [s_t; e(x_t+1); ...; e(x_t+1+i)])     # W_i zero-initialised
    z_i = ResBlock(... ResBlock(z_i))                          # num_layers - 1 blocks
    logits_i = lm_head(z_i)                                     # the base's, shared by default

- "hydra":   s_t = h_t, the base model's final hidden state at t.
- "hydra++": s_t = the output of one extra decoder layer (the "prefix attention" layer, a
  Llama block with its own small KV cache) run causally over the base hidden states h_0..h_t.
  At inference its KV lives in an explicit HydraState, written by `see` and `observe` as
  tokens commit (or kept pending, with plain decoding, until speculation resumes: `prepare`).

An untrained head (all W zero, prefix-layer output projections zero) is the base LM head at t.
This module knows nothing of acceptance, the base model's KV cache or training losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medusa.decoding.buckets import kv_round
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


FOLLOWING = -1  # HydraState.observed: the row has seen every committed token, and sees each step


@dataclass
class HydraState:
    """Hydra++ per-request state: the prefix layer's KV (one layer; the last slot is a scratch
    slot that padded entries write to) and its output at the last committed token.

    A lazy state (`HydraHeads.new_state(lazy=True)`) also keeps `pending`: the base hidden
    states that prompts and plain steps showed it (`see`), at their positions, and on the host,
    per row, how far the prefix layer has seen (`observed`: the positions below it are in its
    KV, or FOLLOWING). `HydraHeads.prepare` runs the prefix layer over the pending positions
    when speculation resumes: plain decoding never pays a layer per step for heads it does not
    use, and the heads propose exactly what they would had they seen every step."""

    cache: KVCache  # k, v [1, B, kv_heads, max_len + 1, head_dim]
    last: torch.Tensor  # [B, D] prefix-layer output at the last committed token
    rope_cos: torch.Tensor  # [P, Dh] the base model's RoPE tables (float32)
    rope_sin: torch.Tensor
    pending: torch.Tensor | None = None  # [B, max_len, D] (lazy): base hidden states by position
    observed: torch.Tensor | None = None  # [B] long on the host (lazy): see above

    @property
    def scratch_slot(self) -> int:
        return self.cache.max_len - 1

    # per-row state (medusa.decoding.kv_pool.PerRow): the cache, `last`, `pending` and `observed`
    # hold one row per request; the RoPE tables are the base model's, shared by every row
    def rows(self, lo: int, hi: int) -> "HydraState":
        lazy = self.pending is not None
        return HydraState(self.cache.rows(lo, hi), self.last[lo:hi], self.rope_cos, self.rope_sin,
                          self.pending[lo:hi] if lazy else None, self.observed[lo:hi] if lazy else None)

    def swap_rows(self, a: int, b: int) -> None:
        self.cache.swap_rows(a, b)
        self.last[[a, b]] = self.last[[b, a]]
        if self.pending is not None:
            self.pending[[a, b]] = self.pending[[b, a]]
            self.observed[[a, b]] = self.observed[[b, a]]

    def scratch(self) -> "HydraState":
        # a trial step writes `pending` only at the positions the real step writes next (as the KV)
        return HydraState(self.cache, self.last.clone(), self.rope_cos, self.rope_sin, self.pending, self.observed)

    def write_back(self, view: "HydraState", lo: int, hi: int) -> None:
        self.cache.write_back(view.cache, lo, hi)
        if view.last.data_ptr() != self.last[lo:hi].data_ptr():
            self.last[lo:hi] = view.last

    def copy_prefix(self, src: "HydraState", k: int, T: int) -> None:
        """Rows 0 .. k-1 of src; a state that is not lazy has seen everything it holds."""
        self.cache.copy_prefix(src.cache, k, T)
        self.last[:k].copy_(src.last[:k])
        if self.observed is not None:
            if src.observed is not None:
                self.observed[:k] = src.observed[:k]
                self.pending[:k, :T].copy_(src.pending[:k, :T])
            else:
                self.observed[:k] = FOLLOWING


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

    def new_state(self, batch: int, max_len: int, base, lazy: bool = False):
        if self.prefix is None:
            return None
        p = self.prefix.self_attn.k_proj.weight
        cache = KVCache.allocate(prefix_config(self.config), batch, max_len + 1, p.dtype, p.device)
        last = torch.zeros(batch, self.config.hidden_size, dtype=p.dtype, device=p.device)
        if not lazy:
            return HydraState(cache, last, base.rope_cos, base.rope_sin)
        pending = torch.zeros(batch, max_len, self.config.hidden_size, dtype=base.dtype, device=p.device)
        return HydraState(cache, last, base.rope_cos, base.rope_sin, pending, torch.zeros(batch, dtype=torch.long))

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

    def see(self, state, seen) -> None:
        """A lazy state stores a prompt's and a plain step's hidden states (`prepare` takes them
        in). Otherwise the prefix layer runs over every new token with the forward's own
        positions, slots and mask, writing its K/V at the same slots as the base model: for a
        tree, a node sees the committed tokens and its ancestors, so on the accepted path this is
        what `observe` computes over the accepted tokens alone; the path's K/V is then committed
        as the base cache's."""
        if self.prefix is None:
            return
        B, N, _ = seen.hidden.shape
        rows = torch.arange(B, device=seen.hidden.device)
        if state.pending is not None and (seen.prompt or N == 1):
            state.pending[rows[:, None], seen.positions] = seen.hidden.to(state.pending.dtype)  # padding: overwritten later
            return
        out = self._prefix(seen.hidden.to(state.last.dtype), seen.positions, state.cache, seen.slots, seen.mask,
                           state.rope_cos, state.rope_sin)  # [B, N, D]
        if seen.prompt:
            picked = out[rows, (seen.count - 1).clamp(0, N - 1)]
            state.last.copy_(torch.where((seen.count > 0)[:, None], picked, state.last))  # in place: may be a view
        else:
            state.cache.commit_path(seen.src, seen.dst)
            state.last.copy_(out[rows, seen.last_node])

    def prepare(self, state, lo: int, kv_lens: list[int], speculating: bool) -> int:
        """Bring rows lo .. lo+n-1 of a lazy state up to date on the host: a row FOLLOWING has
        seen its kv_lens[i] tokens; a row may hold fewer than it had seen (a kept session's
        next turn reuses a prefix of it). Before a speculative step, the prefix layer runs over
        the pending positions of the rows behind, in one forward, and every row follows."""
        if self.prefix is None or state is None or state.observed is None:
            return 0
        obs = state.observed[lo:lo + len(kv_lens)]
        kv = torch.tensor(kv_lens, dtype=torch.long)
        obs.copy_(torch.where(obs == FOLLOWING, kv, torch.minimum(obs, kv)))
        if not speculating:
            return 0
        behind = (obs < kv).nonzero().flatten().tolist()
        if behind:  # only the span of rows that are behind
            a, b = behind[0], behind[-1] + 1
            self._catch_up(state.rows(lo + a, lo + b), obs[a:b].tolist(), kv_lens[a:b])
        obs.fill_(FOLLOWING)
        return len(behind)

    def _catch_up(self, view: HydraState, seen: list[int], committed: list[int]) -> None:
        """The prefix layer over row b's pending positions seen[b] .. committed[b]-1."""
        counts = [c - s for s, c in zip(seen, committed)]
        P, S = max(counts), view.pending.shape[1]
        dev = view.pending.device
        pos = (torch.tensor(seen, device=dev)[:, None] + torch.arange(P, device=dev)).clamp_max(S - 1)  # [B, P]
        hid = view.pending.gather(1, pos[..., None].expand(-1, -1, view.pending.shape[-1]))  # [B, P, D]
        kv_len = kv_round(max(committed), S)  # few distinct shapes
        self.observe(view, hid, pos, torch.tensor(counts, device=dev), kv_len=kv_len)

    def draft_children(self, state, last_hidden, level, chains, k, base):
        """Head `level` over each node's own path (s and the embeddings of chains [B, W, level + 1]):
        one head pass per expanded node, as the static tree's levels run one per parent."""
        s = state.last if self.prefix is not None else last_hidden  # [B, D]
        weight = base.embed_tokens.weight  # [V, D]
        B, W, _ = chains.shape
        embeds = torch.nn.functional.embedding(chains, weight)  # [B, W, level + 1, D]
        x = torch.cat([s[:, None].expand(B, W, s.shape[-1]).to(weight.dtype), embeds.flatten(-2)], dim=-1)
        z = self.heads[level].from_inputs(s[:, None].to(weight.dtype), x)  # [B, W, D]
        return self.draft_topk_logp(level, z, base, k)

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
