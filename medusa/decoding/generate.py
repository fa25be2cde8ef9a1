"""Decode one request: prefill, then speculative steps, streaming tokens as they are accepted
and stopping on EOS, stop sequences or max_new_tokens. Built on medusa.decoding.step.

Knows token ids only (never text) and nothing of batching policy or transport."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from medusa.decoding.sampling import BatchSampling, SamplingParams, draw_uniforms
from medusa.decoding.lookup import NgramLookup
from medusa.decoding.step import prefill, speculate
from medusa.decoding.stopping import stop_cut as _stop_cut
from medusa.decoding.tree import Tree, load_tree
from medusa.errors import RequestError


@dataclass(frozen=True)
class Chunk:
    """Tokens emitted by one forward pass (the prefill, or one verification step)."""

    tokens: list[int]
    accepted: int  # tokens this step produced (accepted candidates + bonus); 1 for the prefill
    finish_reason: str | None = None  # "eos" | "stop" | "length" on the last chunk


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # verification forwards (the prefill excluded)
    step_tokens: list[int] = field(default_factory=list)  # tokens produced by each step
    seconds: float = 0.0
    ttft: float = 0.0  # seconds to the first token
    finish_reason: str | None = None

    @property
    def mean_accepted(self) -> float:
        """Mean tokens produced per verification step (1.0 for plain decoding)."""
        return sum(self.step_tokens) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate(
    model,
    prompt_ids: list[int],
    *,
    heads=None,
    tree: Tree | str | None = None,
    params: SamplingParams = SamplingParams(),
    max_new_tokens: int = 256,
    stop_token_ids: tuple[int, ...] | None = None,
    stop_sequences: list[list[int]] = (),
    stats: Stats | None = None,
    runner=None,
) -> Iterator[Chunk]:
    """Stream the chunks of one request. With heads=None (or the 'ar' tree) this is plain
    autoregressive decoding through the very same step. `runner` (a graphs.GraphRunner built
    for the same model and heads, batch 1) replays the step as a CUDA graph. A tree's lookup
    chain (Tree.lookup) drafts from the sequence itself, for greedy requests: a sampled request
    decodes with the heads' nodes alone (sampling stays exact only while sibling nodes carry
    distinct tokens, and a lookup guess may repeat a head's)."""
    cfg = model.cfg
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tree = load_tree("ar") if heads is None else (tree if isinstance(tree, Tree) else load_tree(tree))
    if tree.lookup and not params.greedy:
        tree = tree.heads_only
    if heads is not None and tree.max_depth > heads.config.num_heads:
        raise RequestError(f"tree {tree.name} is {tree.max_depth} deep but the heads guess only {heads.config.num_heads} tokens ahead")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's context of {cfg.max_position_embeddings} tokens"
        )
    if max(prompt_ids) >= cfg.vocab_size or min(prompt_ids) < 0:
        raise RequestError("prompt holds token ids outside the vocabulary")
    eos = set(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    dev = model.device
    gen = None
    if not params.greedy:
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    sampling = BatchSampling.stack([params], dev)
    uniforms = (lambda n: draw_uniforms([gen], n, dev)) if gen is not None else (lambda n: None)

    max_len = min(cfg.max_position_embeddings, total) + tree.num_nodes + 1
    graphed = runner is not None and runner.heads is heads and runner.batch == 1 and runner.max_len >= max_len
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = runner.cache if graphed else model.new_cache(1, max_len)
        tokens = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
        head_state = runner.head_state if graphed else None
        body, lengths, seeing = None, None, heads  # graphed: the prompt's forward replays its bucket's graph
        if graphed and runner.prefills.shape(1, len(prompt_ids)) is not None:
            lengths = torch.tensor([len(prompt_ids)], device=dev)
            body = lambda t: runner.prefills.run(t, cache, lengths, head_state)  # noqa: E731
            seeing = None if runner.prefills.observes else heads  # the graph showed the heads the prompt
        state = prefill(model, seeing, cache, tokens, torch.zeros(1, dtype=torch.long, device=dev), sampling, uniforms(1),
                        head_state=head_state, lengths=lengths, body=body)
        if graphed:
            runner.load(state, sampling)
        out: list[int] = [int(state.root[0])]
        look = NgramLookup(list(prompt_ids) + out) if tree.lookup else None
        stats.ttft = time.perf_counter() - t0
        chunk_tokens, produced = out[:], 1
        while True:
            head = out[:max_new_tokens]  # a stop past max_new_tokens (speculative overshoot) does not count
            cut = _stop_cut(head, min(len(out) - len(chunk_tokens), len(head)), eos, stop_sequences)
            if cut is None and len(out) >= max_new_tokens:
                cut = (max_new_tokens, "length")
            if cut is not None:
                keep = cut[0] - (len(out) - len(chunk_tokens))
                stats.new_tokens = cut[0]
                stats.finish_reason = cut[1]
                stats.seconds = time.perf_counter() - t0
                yield Chunk(chunk_tokens[:keep], produced, cut[1])
                return
            yield Chunk(chunk_tokens, produced)
            if look is not None:
                draft = [look.draft(tree.lookup)]
                if graphed:
                    runner.set_draft(draft)
                else:
                    state.draft = torch.tensor(draft, dtype=torch.long, device=dev)
            if graphed:  # committed tokens = prompt + emitted - the root (not yet in the cache)
                acc = runner.step(tree, len(prompt_ids) + len(out) - 1, uniforms(tree.num_nodes))
            else:
                acc = speculate(model, heads, tree, state, sampling, uniforms(tree.num_nodes))
            row = torch.cat([acc.length[:1], acc.tokens[0]]).tolist()  # one host sync: [accepted, D + 1 tokens]
            n = row[0] + 1
            chunk_tokens = row[1:1 + n]
            produced = n
            out.extend(chunk_tokens)
            if look is not None:
                look.extend(chunk_tokens)
            stats.steps += 1
            stats.step_tokens.append(n)
            stats.new_tokens = len(out)
            stats.seconds = time.perf_counter() - t0
