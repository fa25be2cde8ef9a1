"""The lockstep protocol end to end: a plan executor that runs medusa.decoding.step's pure
functions (prefill, speculate) on this rank's shard, unchanged, and a rank-0 driver that
decodes one request by sending plans. A demonstration and a test bed of the seam, not the
engine: the engine's step runner plugs in where `Executor` is (any callable taking a plan).

Plans (StepPlan.op, with their host-side inputs):
  tree      register a Tree under its name (sent once; steps then name it)
  prefill   a session's prompt, sampling settings and seed -> the first token
  greedy    one plain step whose next token is a distributed argmax (no logits gathered)
  speculate one tree step (heads' candidates + a lookup draft chosen on rank 0) -> tokens
  logits    a teacher-forced forward -> the full logits (tests)
  release   drop a session
Random draws come from a generator per session seeded from the plan on every rank, in the
order medusa.decoding.generate draws them, so a seed gives the same tokens as one device.

Knows nothing of scheduling, batching, stopping rules or text."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from medusa.decoding.lookup import NgramLookup
from medusa.decoding.sampling import BatchSampling, SamplingParams, draw_uniforms
from medusa.decoding.step import DecodeState, attention_mask, kv_round, prefill, speculate
from medusa.decoding.tree import Tree
from medusa.parallel.load import full_embedding
from medusa.parallel.lockstep import Lockstep, StepPlan
from medusa.parallel.shard import distributed_argmax


class StepModel:
    """A sharded model as the step functions and the heads see it: calls and attributes go to
    the model, except `embed_tokens.weight`, which Hydra heads index by token id: the whole
    table there (gathered once, replicated), the model's own vocabulary shard otherwise."""

    def __init__(self, model, embedding: torch.Tensor | None = None):
        self.model = model
        self.embed_tokens = SimpleNamespace(weight=embedding) if embedding is not None else model.embed_tokens

    def __call__(self, *args, **kw):
        return self.model(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def step_model(model, heads) -> StepModel:
    """The StepModel `heads` need (a collective when they index the embedding: every rank calls it)."""
    from medusa.heads.hydra import HydraHeads

    needs_table = isinstance(heads, HydraHeads) and model.tp_group.world > 1
    return StepModel(model, full_embedding(model) if needs_table else None)


@dataclass
class _Session:
    state: DecodeState
    sampling: BatchSampling
    gen: torch.Generator | None
    heads: bool


class Executor:
    """Runs plans on this rank (a table of small functions, one per op)."""

    def __init__(self, model, heads=None):
        self.base = step_model(model, heads)
        self.model, self.heads = model, heads
        self.dev = model.device
        self.trees: dict[str, Tree] = {}
        self.sessions: dict[int, _Session] = {}

    def __call__(self, plan: StepPlan) -> Any:
        with torch.inference_mode():
            return getattr(self, "op_" + plan.op)(**plan.args)

    def _uniforms(self, s: _Session, n: int) -> torch.Tensor | None:
        return None if s.gen is None else draw_uniforms([s.gen], n, self.dev)

    def op_tree(self, tree: Tree) -> None:
        self.trees[tree.name] = tree

    def op_prefill(self, sid: int, tokens: list[int], max_len: int, params: dict, seed: int | None = None,
                   heads: bool = False) -> int:
        p = SamplingParams(**params)
        gen = None
        if not p.greedy:
            gen = torch.Generator(device=self.dev)
            gen.manual_seed(seed)
        sampling = BatchSampling.stack([p], self.dev)
        h = self.heads if heads else None
        s = _Session(None, sampling, gen, heads)
        cache = self.model.new_cache(1, max_len)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.dev)
        s.state = prefill(self.base, h, cache, ids, torch.zeros(1, dtype=torch.long, device=self.dev), sampling,
                          self._uniforms(s, 1))
        self.sessions[sid] = s
        return int(s.state.root[0])

    def op_greedy(self, sid: int) -> int:
        st = self.sessions[sid].state
        start = st.start  # [1]
        kv_len = kv_round(int(start.max()) + 1, st.cache.max_len)
        mask = attention_mask(start, torch.ones(1, 1, dtype=torch.bool, device=self.dev), kv_len)
        h = self.model(st.root[:, None], start[:, None], st.cache, start[:, None], mask, logits_for=None).hidden  # [1, 1, D]
        nxt = distributed_argmax(self.model.lm_head.local_logits(h[:, 0]), self.model.lm_head)  # [1]
        st.start, st.last_hidden, st.root = start + 1, h[:, 0], nxt
        return int(nxt[0])

    def op_speculate(self, sid: int, tree: str, draft: list[int] | None = None) -> list[int]:
        s = self.sessions[sid]
        t = self.trees[tree]
        if draft is not None:
            s.state.draft = torch.tensor([draft], dtype=torch.long, device=self.dev)
        acc = speculate(self.base, self.heads if s.heads else None, t, s.state, s.sampling,
                        self._uniforms(s, t.num_nodes))
        n = int(acc.length[0]) + 1
        return acc.tokens[0, :n].tolist()

    def op_logits(self, tokens: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.dev)  # [B, T]
        B, T = ids.shape
        cache = self.model.new_cache(B, T)
        pos = torch.arange(T, device=self.dev)[None].expand(B, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=self.dev).tril()[None].expand(B, T, T)
        return self.model(ids, pos, cache, pos, mask, logits_for="all").logits.float().cpu()  # [B, T, V]

    def op_release(self, sid: int) -> None:
        self.sessions.pop(sid, None)


def decode(lock: Lockstep, prompt: list[int], max_new: int, tree: Tree | None = None,
           params: SamplingParams = SamplingParams(), seed: int | None = None, sid: int = 0) -> list[int]:
    """Rank 0: decode one request through plans: plain greedy steps (tree None) or tree steps
    with the heads (a lookup chain drafted here, on the host, for greedy requests). Runs
    exactly max_new tokens (no stop tokens): the same draws as medusa.decoding.generate with
    stop_token_ids=()."""
    if tree is not None and tree.lookup and not params.greedy:
        tree = tree.heads_only  # as generate: sampled rows take the heads' nodes alone
    nodes = tree.num_nodes if tree is not None else 1
    if tree is None and not params.greedy:
        raise ValueError("the plain demo path is greedy (distributed argmax); sample with a tree")
    max_len = len(prompt) + max_new + nodes + 1
    if tree is not None:
        lock.run(StepPlan("tree", {"tree": tree}))
    out = [lock.run(StepPlan("prefill", {"sid": sid, "tokens": list(prompt), "max_len": max_len,
                                         "params": vars(params).copy(), "seed": seed, "heads": tree is not None}))]
    look = NgramLookup(list(prompt) + out) if tree is not None and tree.lookup else None
    while len(out) < max_new:
        if tree is None:
            out.append(lock.run(StepPlan("greedy", {"sid": sid})))
            continue
        draft = look.draft(tree.lookup) if look is not None else None
        new = lock.run(StepPlan("speculate", {"sid": sid, "tree": tree.name, "draft": draft}))
        out.extend(new)
        if look is not None:
            look.extend(new)
    lock.run(StepPlan("release", {"sid": sid}))
    return out[:max_new]
