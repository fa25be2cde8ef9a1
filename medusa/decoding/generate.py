"""Decode one request at a time: a few lines over the one Engine (max_batch=1), for callers
that want chunks and per-step figures rather than a request stream (the CLI without
--concurrency, `medusa bench --dataset`, tests). A lone request is admitted at once, so this is
the engine's batch-1 loop, with the same runner, graphs and step.

Knows token ids only (never text) and nothing of batching policy or transport."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from medusa.decoding.engine import Engine, Request
from medusa.decoding.graphs import AUTO
from medusa.decoding.sampling import SamplingParams
from medusa.decoding.dynamic_tree import DynamicTree
from medusa.decoding.tree import Tree, load_tree
from medusa.errors import RequestError


@dataclass(frozen=True)
class Chunk:
    """Tokens emitted by one forward pass (the prefill, or one verification step)."""

    tokens: list[int]
    accepted: int  # tokens this step produced (accepted candidates + bonus); 1 for the prefill
    finish_reason: str | None = None  # "eos" | "stop" | "length" on the last chunk
    logprobs: list | None = None  # a TokenLogprob per token, when asked (generate(logprobs=k))


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # verification forwards (the prefill excluded)
    step_tokens: list[int] = field(default_factory=list)  # tokens produced by each step
    seconds: float = 0.0
    ttft: float = 0.0  # seconds to the first token
    finish_reason: str | None = None
    tree: str = "ar"  # the last tree a step used ("ar": plain decoding)

    @property
    def mean_accepted(self) -> float:
        """Mean tokens produced per verification step (1.0 for plain decoding)."""
        return sum(self.step_tokens) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def check_context(cfg, prompt_len: int, max_new_tokens: int) -> int:
    """prompt + max_new_tokens, or a RequestError when it exceeds the model's context."""
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = prompt_len + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise RequestError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                           f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
    return total


def single_engine(model, heads=None, tree: Tree | str | None = None, *, max_seq_len: int,
                  graphs: bool | None = None, max_batch: int = 1, compile_mode: str | None = AUTO) -> Engine:
    """An engine that decodes with exactly `tree` when a request asks for speculation "on"
    (no other tree but plain decoding). heads=None or the 'ar' tree: plain decoding.
    compile_mode: Engine's (torch.compile inside the step graphs)."""
    tree = tree if isinstance(tree, (Tree, DynamicTree)) else load_tree(tree or ("ar" if heads is None else None))
    if heads is not None and tree.max_depth > heads.config.num_heads:
        raise RequestError(f"tree {tree.name} is {tree.max_depth} deep but the heads guess only {heads.config.num_heads} tokens ahead")
    if tree.num_nodes == 1:
        heads = None  # plain decoding: the heads would only observe
    return Engine(model, heads, tree, max_batch=max_batch, max_seq_len=max_seq_len, trees={}, graphs=graphs,
                  compile_mode=compile_mode)


def stream(engine: Engine, prompt_ids: list[int], *, params: SamplingParams = SamplingParams(),
           max_new_tokens: int = 256, stop_token_ids: tuple[int, ...] | None = None,
           stop_sequences=(), stats: Stats | None = None, speculation: str | None = None,
           logprobs: int | None = None) -> Iterator[Chunk]:
    """Submit one request to `engine` and yield its chunks (driving the engine when it has no
    scheduler thread). speculation: default "on" when the engine has heads, else "off"."""
    if speculation is None:
        speculation = "on" if engine.heads is not None and engine.default_tree.num_nodes > 1 else "off"
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    req = Request(list(prompt_ids), max_new_tokens=max_new_tokens, sampling=params, stop_token_ids=stop_token_ids,
                  stop_sequences=tuple(tuple(s) for s in stop_sequences), speculation=speculation, logprobs=logprobs)
    first = True
    for ev in engine.submit(req):
        if not first and ev.produced:  # the first event is the prefill's token
            stats.steps += 1
            stats.step_tokens.append(ev.produced)
        first = False
        stats.new_tokens += len(ev.tokens)
        if ev.stats is not None:
            st = ev.stats
            stats.new_tokens, stats.seconds, stats.ttft, stats.tree = st.new_tokens, st.seconds, st.ttft_s, st.tree
            stats.finish_reason = ev.finish_reason
        yield Chunk(list(ev.tokens), ev.produced, ev.finish_reason, ev.logprobs)


def generate(model, prompt_ids: list[int], *, heads=None, tree: Tree | str | None = None,
             params: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
             stop_token_ids: tuple[int, ...] | None = None, stop_sequences=(), stats: Stats | None = None,
             engine: Engine | None = None, logprobs: int | None = None) -> Iterator[Chunk]:
    """Stream the chunks of one request. With heads=None (or the 'ar' tree) this is plain
    autoregressive decoding through the very same step. `engine` (from `single_engine`, built
    for the same model, heads and tree) is reused instead of building one for this request
    (its graphs and buffers stay warm). A tree's lookup chain (Tree.lookup) drafts from the
    sequence itself for greedy requests; a sampled request decodes with the heads' nodes alone.
    logprobs: k in 0..5 gives each chunk the tokens' base-model log-probabilities and top k."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    total = check_context(model.cfg, len(prompt_ids), max_new_tokens)
    if engine is None:
        engine = single_engine(model, heads, tree, max_seq_len=total)
    return stream(engine, prompt_ids, params=params, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                  stop_sequences=stop_sequences, stats=stats, logprobs=logprobs)
