"""The decode step, one function for every caller (CLI, benchmarks, engine, services):

    candidates = heads.propose(...)                      # [B, N] token per tree node
    out        = model(candidates, start + tree.depth, mask=tree mask over the cache)
    accepted   = verify(out.logits, candidates, tree, sampling)
    cache.commit_path(accepted path -> slots start .. start + length)

A dynamic tree (dynamic_tree.py) is grown per row inside the step instead (`heads.grow`: the
nodes' tokens, depths and ancestor mask [B, N, N], and the parent / path tables verify reads).
Plain autoregressive decoding is the same step with the one-node tree and no heads. Draft heads
with state of their own see what each forward computed through one call (`DraftHeads.see`),
with everything passed explicitly; whether they keep it now or later is theirs to decide.
State lives in an explicit DecodeState passed in, never on a module. This module does not
know about requests, stopping, text, or scheduling."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from medusa.decoding.buckets import kv_round
from medusa.decoding.dynamic_tree import is_dynamic, with_chain
from medusa.decoding.logprobs import path_logprobs
from medusa.decoding.sampling import BatchSampling, base_probs, sample_from
from medusa.decoding.tree import Tree
from medusa.decoding.verify import Acceptance, verify
from medusa.heads.base import Seen
from medusa.model.kv_cache import KVCache

@dataclass
class DecodeState:
    """Decode state of B rows sharing one KV cache."""

    cache: KVCache
    start: torch.Tensor  # [B] long: tokens committed to the cache (= RoPE position of root)
    root: torch.Tensor  # [B] long: next token, already chosen (emitted), not yet in the cache
    last_hidden: torch.Tensor  # [B, D]: hidden state of the last committed token
    head_state: Any = None
    draft: torch.Tensor | None = None  # [B, >= L] long: tokens of a tree's lookup chain (Tree.lookup), set before each step
    logprobs: Any = None  # prefill(logprobs=True): logprobs.PathLogprobs of each row's first token


def attention_mask(start: torch.Tensor, local: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, N, S] bool: query n of row b sees the committed slots s < start[b], plus the new
    slots start[b] + j for which local[n, j] (causal for prefill, ancestors for a tree; local
    [B, N, N]: each row's own tree).
    Any start is safe: new slots at or past kv_len are simply not in the mask (an idle row riding
    along in a padded batch may sit anywhere); every query sees at least one slot."""
    B, N = start.shape[0], local.shape[-1]
    dev = start.device
    rel = torch.arange(kv_len, device=dev)[None, :] - start[:, None]  # [B, S]: slot - start
    new = (rel >= 0) & (rel < N)
    local = local.to(dev).expand(B, N, N)  # [N, N] for every row, or [B, N, N] (a dynamic tree per row)
    picked = local.gather(2, rel.clamp(0, N - 1)[:, None, :].expand(B, N, kv_len))  # [B, N, S]: local[n, slot - start]
    return (rel < 0)[:, None, :] | (picked & new[:, None, :])


def _kv_len(start: torch.Tensor, n: int, max_len: int) -> int:
    return kv_round(int(start.max()) + n, max_len)


def first_token(model, hidden: torch.Tensor, lengths: torch.Tensor, sampling: BatchSampling,
                uniforms: torch.Tensor | None, logprobs: bool = False):
    """Each row's first new token (the root) from a prompt forward's final hidden states
    [B, T, D] (row b's last real token at lengths[b] - 1): root [B], that token's hidden
    state [B, D] and, with logprobs, the root's log-probabilities (a PathLogprobs of one
    position; else None). The prompt forward may have run anywhere (runner.py runs padded ones)."""
    last = (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])  # [B, 1, D]
    last_hidden = hidden.gather(1, last)  # [B, 1, D]
    logits = model.lm_head(last_hidden)  # [B, 1, V]
    if uniforms is None or not sampling.any_random:
        root = logits[:, 0].argmax(-1)
    else:
        root = sample_from(base_probs(logits, sampling), uniforms)[:, 0]
    B = root.shape[0]
    lp = path_logprobs(logits, torch.zeros(B, 1, dtype=torch.long, device=root.device), root[:, None]) if logprobs else None
    return root, last_hidden[:, 0], lp


def prefill(
    model,
    heads,
    cache: KVCache,
    tokens: torch.Tensor,  # [B, T] new tokens of each row (right-padded when `lengths` is given)
    start: torch.Tensor,  # [B] tokens already in the cache (0, or a reused session prefix)
    sampling: BatchSampling,
    uniforms: torch.Tensor | None,  # [B, 1] or None when every row is greedy
    head_state: Any = None,
    lengths: torch.Tensor | None = None,  # [B] real new tokens per row (default: all T)
    logprobs: bool = False,  # also the first token's log-probabilities (DecodeState.logprobs)
) -> DecodeState:
    """Run the prompt, choose each row's first new token (the root) and show the draft heads
    the prompt (`DraftHeads.see`). Padding tokens past a row's length write K/V only past its
    new start, which later steps overwrite, and no real token attends to them (causal mask)."""
    B, T = tokens.shape
    dev = tokens.device
    if lengths is None:
        lengths = torch.full((B,), T, device=dev, dtype=torch.long)
    offsets = torch.arange(T, device=dev)
    positions = start[:, None] + offsets  # [B, T]
    kv_len = _kv_len(start, T, cache.max_len)
    mask = attention_mask(start, torch.ones(T, T, dtype=torch.bool, device=dev).tril(), kv_len)
    hidden = model(tokens, positions, cache, positions, mask, logits_for=None).hidden  # [B, T, D]
    root, last_hidden, lp = first_token(model, hidden, lengths, sampling, uniforms, logprobs)
    if heads is not None:
        if head_state is None:
            head_state = heads.new_state(B, cache.max_len, model)
        heads.see(head_state, Seen(hidden, positions, positions, mask, kv_len, count=lengths))
    return DecodeState(cache, start + lengths, root, last_hidden, head_state, logprobs=lp)


def speculate(
    model,
    heads,
    tree: Tree,
    state: DecodeState,
    sampling: BatchSampling,
    uniforms: torch.Tensor | None,  # [B, N] or None when every row is greedy
    max_accept: torch.Tensor | None = None,  # [B] long: cap on accepted candidates (0: this row decodes plainly)
    kv_len: int | None = None,  # cache slots to attend over (fixed for CUDA graphs; default: bucketed, needs a host sync)
    logprobs: bool = False,  # also the emitted tokens' log-probabilities (Acceptance.logprobs)
) -> Acceptance:
    """One verification forward over every tree node; commits the accepted path, shows the draft
    heads what the forward computed and which nodes were accepted (`DraftHeads.see`), and
    advances `state` in place. Returns what each row accepted. heads None: plain decoding."""
    B, N = state.root.shape[0], tree.num_nodes
    dev = state.root.device
    if tree.lookup and (state.draft is None or state.draft.shape[1] < tree.lookup):
        raise ValueError(f"tree {tree.name} has a lookup chain of {tree.lookup} nodes: set state.draft [B, >= {tree.lookup}]")
    if is_dynamic(tree):  # a tree per row, grown from the heads' confidences (dynamic_tree.py)
        if heads is None:
            raise ValueError(f"tree {tree.name} is grown by draft heads: none given")
        if not tree.max_depth:  # as deep as these heads guess (the engine binds its trees once)
            tree = tree.bind(heads.config.num_heads)
        rows = heads.grow(state.head_state, state.last_hidden, state.root, tree, model)  # the heads' N nodes
        if tree.lookup:
            rows = with_chain(rows, state.draft[:, :tree.lookup], tree.accept_depth + 1)
        cand, depth, local, tables = rows.tokens, rows.depth, rows.mask, rows  # [B, N], [B, N], [B, N, N]
        if uniforms is not None:  # column d of a dynamic tree's uniforms is depth d's draw (DynamicTree.depth)
            uniforms = uniforms.gather(1, depth)
    else:
        if heads is None or tree.head_nodes == 1:
            cand = state.root[:, None]  # [B, 1]
        else:
            cand = heads.propose(state.head_state, state.last_hidden, state.root, tree.heads_only, model)  # [B, head_nodes]
        if tree.lookup:  # the lookup chain's tokens, chosen on the host (medusa.decoding.lookup)
            cand = torch.cat([cand, state.draft[:, :tree.lookup]], 1)  # [B, N]
        depth, local, tables = tree.depth.to(dev), tree.mask, tree
    positions = state.start[:, None] + depth  # [B, N] RoPE positions
    slots = state.start[:, None] + torch.arange(N, device=dev)  # [B, N] one cache slot per node
    kv_len = kv_len or _kv_len(state.start, N, state.cache.max_len)
    mask = attention_mask(state.start, local, kv_len)
    out = model(cand, positions, state.cache, slots, mask, logits_for="all")  # logits [B, N, V]
    acc = verify(out.logits, cand, tables, sampling, uniforms, max_accept)  # tables: parent, retrieve
    if logprobs:  # from the logits at hand: node path[d] predicted the token emitted at index d
        acc = replace(acc, logprobs=path_logprobs(out.logits, acc.path, acc.tokens))
    # move the accepted path's K/V to slots start .. start + length (padding copies are harmless:
    # they land at or beyond the new start, which later steps overwrite)
    path = acc.path.clamp_min(0)  # [B, D+1]
    src = state.start[:, None] + path  # [B, D+1]
    dst = (state.start[:, None] + torch.arange(path.shape[1], device=dev)).clamp_max(state.cache.max_len - 1)
    state.cache.commit_path(src, dst)
    if heads is not None:
        heads.see(state.head_state, Seen(out.hidden, positions, slots, mask, kv_len, src=src, dst=dst,
                                         last_node=acc.last_node))
    state.last_hidden = out.hidden[torch.arange(B, device=dev), acc.last_node]  # [B, Dm]
    state.start = state.start + acc.length + 1
    state.root = acc.tokens.gather(1, acc.length[:, None]).squeeze(1)  # the bonus token
    return acc
