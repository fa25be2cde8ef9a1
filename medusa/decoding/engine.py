"""The batched speculative-decoding engine: continuous batching of many requests over one
preallocated KV pool, each request with its own sampling, stopping and speculation switch.

One scheduler iteration (`Engine.step`):
  1. apply cancellations (a cancelled request's row is freed at once);
  2. admit waiting requests while a pool row is free (while rows run, arrivals wait a few steps
     for company): the admitted rows prefill in padded forwards on a view of their cache rows
     (`step.prefill` with start > 0 where a kept session holds a prefix); fresh prompts, sorted
     by length and split where padding would cost more than another forward, run at bucketed
     shapes, as CUDA graphs on a GPU (runner.py, staging.py);
  3. one batched verification step (`step.speculate`) over all running rows: the running rows
     are kept in rows 0 .. n-1 of the pool (see kv_pool.py), so the step runs on a zero-copy
     view of them, padded to the batch bucket by idle rows (on a GPU, as the bucket's CUDA
     graph: see runner.py). Each row advances by its own accepted length.
The tree is chosen per step for the whole batch (adaptive.py): "auto" rows follow the load-
adaptive choice, an "on" row makes the step use the engine's default tree, and "off" rows ride
along in the same forward with their acceptance capped at the root (plain decoding; their
extra tree nodes are wasted compute, which the policy counts).

Sampled rows draw from a per-request seeded stream of uniforms indexed by output position
(token j of a request always uses uniform j), so a sampled request's tokens do not depend on
its batch-mates, on the tree chosen, or on whether it speculated.

This module knows token ids only (never text), and nothing of transports or tenants: session
ids arrive already namespaced. All decoding goes through medusa.decoding.step."""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from medusa.decoding.adaptive import AcceptanceMeter, Choice, StepCostModel, TreeOption, batch_bucket, choose_tree
from medusa.decoding.runner import RowState, Runner
from medusa.decoding.staging import plan_groups
from medusa.decoding.lookup import NgramLookup
from medusa.decoding.kv_pool import RowPool, Swap, state_rows, swap_cache_rows, swap_state_rows, write_back
from medusa.decoding.sampling import BatchSampling, SamplingParams, draw_uniforms
from medusa.decoding.step import catch_up
from medusa.decoding.stopping import stop_cut
from medusa.decoding.tree import (MAX_LOOKUP, NAMED_TREES, Tree, accepted_within, expected_accept_length, load_tree,
                                  nodes_inside, prior_accuracies)
from medusa.errors import RequestError, TreeError

SPECULATION = ("auto", "on", "off")
DEFAULT_TREE = "tree16"
DEFAULT_MAX_SEQ_LEN = 2048
SPEC_MARGIN = 0.1  # a tree must promise 10% more tokens/s than plain decoding (adaptive.choose_tree): under
# load speculation also costs what step times miss (catching Hydra++ up, rows finishing out of step and so
# more prefill forwards); a 25% margin did not fix concurrency 64 on an H100 and cost gains at 4 and 16
REFRESH_EVERY = 256  # plain steps after which the most promising tree runs once to re-measure acceptance
CHOICE_STEPS = 8
# tokens per step a lookup chain of 16 nodes is assumed to add until it is measured (shorter: in proportion):
# on an H100, all 80 MT-Bench prompts x 256 tokens, batch 1, the shipped Hydra++ tree accepted 2.75 per
# step alone and 4.05 with 16 lookup nodes (3.67 with 8). Optimistic on purpose: the AcceptanceMeter
# replaces it after `explore` rows, and a prior of the heads' paths alone kept the larger step from ever
# being tried at concurrency 1
LOOKUP_PRIOR_16 = 1.3
SHADOW_BATCH = 4  # up to this many rows, a step without a lookup chain still measures its twin with one (_shadow)


# ------------------------------------------------------------------ public types

@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] | None = None  # None -> the model's EOS ids
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id stop sequences
    speculation: str = "auto"  # "on" | "off" | "auto"
    session_id: str | None = None  # KV reuse across turns (namespaced by the caller)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class RequestStats:
    prompt_tokens: int
    new_tokens: int
    steps: int  # verification steps the request took part in (prefill excluded)
    mean_accepted: float  # tokens per step (accepted candidates + bonus; 1.0 = plain)
    reused_tokens: int  # prompt tokens served from a kept session KV (0 = full prefill)
    ttft_s: float  # submit -> first token (queueing included)
    seconds: float  # submit -> last token
    tree: str  # last tree used ("ar" when plain)


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    tokens: list[int]  # new tokens (may be empty on the final event)
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled" | "error" on the last event
    stats: RequestStats | None = None  # on the last event only
    produced: int = 0  # tokens the forward behind this event produced, before any stop cut (0: none ran)


class RequestHandle:
    """The stream of one request's TokenEvents. Iterating an engine that has no scheduler thread
    (no `start()`) drives it synchronously."""

    def __init__(self, engine: "Engine", request_id: str):
        self.request_id = request_id
        self._engine = engine
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    def _push(self, ev: TokenEvent) -> None:  # engine side
        with self._lock:
            if self._async is not None:
                loop, aq = self._async
                loop.call_soon_threadsafe(aq.put_nowait, ev)
            else:
                self._q.put(ev)

    def _next(self) -> TokenEvent:
        while True:
            try:
                return self._q.get_nowait()
            except queue.Empty:
                pass
            if self._engine._thread is None:
                if not self._engine.step() and self._q.empty():
                    raise RuntimeError(f"request {self.request_id} is not known to the engine")
            else:
                try:
                    return self._q.get(timeout=0.1)
                except queue.Empty:
                    continue

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._next()
            yield ev
            if ev.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while True:
                try:
                    aq.put_nowait(self._q.get_nowait())
                except queue.Empty:
                    break
            self._async = (loop, aq)
        while True:
            if aq.empty() and self._engine._thread is None:
                if not await asyncio.to_thread(self._engine.step) and aq.empty():
                    await asyncio.sleep(0)  # events pushed from the worker thread arrive via the loop
                    if aq.empty():
                        raise RuntimeError(f"request {self.request_id} is not known to the engine")
                continue
            ev = await aq.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop the request. Its row is freed at once, or at the end of the step running now;
        the final event says "cancelled". Cancelling a finished request does nothing."""
        self._engine._cancel(self.request_id)

    def result(self) -> tuple[list[int], RequestStats]:
        tokens: list[int] = []
        stats = None
        for ev in self:
            tokens.extend(ev.tokens)
            stats = ev.stats
        return tokens, stats


# ------------------------------------------------------------------ per-request bookkeeping

class _Uniforms:
    """A request's seeded uniforms, indexed by output position."""

    CHUNK = 256

    def __init__(self, seed: int, device):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.buf = torch.empty(0, device=self.device)

    def at(self, first: int, offsets: torch.Tensor, max_offset: int) -> torch.Tensor:
        """Uniforms for output positions first + offsets ([N] long, at most max_offset)."""
        while self.buf.numel() <= first + max_offset:
            self.buf = torch.cat([self.buf, draw_uniforms([self.gen], self.CHUNK, self.device)[0]])
        return self.buf[first + offsets]


@dataclass(eq=False)
class _Live:
    req: Request
    handle: RequestHandle
    eos: set
    t_submit: float
    uniforms: _Uniforms | None
    row: int = -1
    out: list[int] = field(default_factory=list)  # every token produced (may run past the cut)
    sent: int = 0
    reused: int = 0
    steps: int = 0
    step_tokens: int = 0
    t_first: float = 0.0
    tree: str = "ar"
    seen: int = 0  # committed tokens the draft heads have observed (plain steps defer, step.catch_up)
    lookup: NgramLookup | None = None  # the sequence's n-grams, from its first step with a lookup chain
    shadow: list = field(default_factory=list)  # (output index, draft, heads' accepted) of steps whose chain went unrun
    queued_step: int = 0  # engine step count at submission (admission coalescing)

    @property
    def kv_len(self) -> int:  # committed KV slots (the last produced token is not in the cache yet)
        return len(self.req.prompt_ids) + len(self.out) - 1


# ------------------------------------------------------------------ the engine

class Engine:
    """Continuous-batching speculative decoder. Thread-safe `submit`/`cancel`; one scheduler
    (a background thread after `start()`, or the caller through `step()`)."""

    def __init__(self, model, heads=None, tree: Tree | str | None = None, *, max_batch: int = 16,
                 kv_budget_tokens: int | None = None, max_seq_len: int | None = None,
                 trees: dict[str, Tree] | None = None, step_cost: dict | None = None,
                 graphs: bool | None = None, prefill_tokens: int | None = None,
                 admit_wait_steps: int | None = None):
        if max_batch < 1:
            raise RequestError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.heads = model, heads
        cfg = model.cfg
        self.device = model.device
        self.eos = tuple(cfg.eos_token_ids)
        self.vocab = cfg.vocab_size
        self.max_pos = cfg.max_position_embeddings
        self.trees, self.default_tree = self._trees(heads, tree, trees)
        # the smaller trees each tree holds: a step over a tree measures their acceptance too, on the
        # same tokens (tree.accepted_within), so the policy compares trees on equal terms instead of
        # on whichever stretch of text each one happened to run
        self._inside = {big: [(n, inside) for n, t in self.trees.items()
                              if 1 < t.num_nodes < b.num_nodes and (inside := nodes_inside(b, t)) is not None]
                        for big, b in self.trees.items() if b.num_nodes > 2}
        # a lookup tree's heads' nodes alone -> the lookup tree (their steps measure it too: _shadow)
        self._twin = {t.heads_only.name: t for t in self.trees.values() if t.lookup and t.heads_only.name in self.trees}
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, self.max_pos)
        n_max = max(t.num_nodes for t in self.trees.values())
        self.row_len = self.max_seq_len + n_max + 1  # room for the last step's tree slots
        rows = max_batch if kv_budget_tokens is None else kv_budget_tokens // self.max_seq_len
        if rows < 1:
            raise RequestError(f"kv_budget_tokens={kv_budget_tokens} holds no row of max_seq_len={self.max_seq_len} tokens")
        self.pool = RowPool(rows, max_batch)
        with torch.inference_mode():
            self.cache = model.new_cache(rows, self.row_len)  # kv [L, 2, rows, Hkv, row_len, Dh]
            self.head_state = heads.new_state(rows, self.row_len, model) if heads is not None else None
            self.row_start = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows]
            self.row_root = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows]
            self.row_hidden = torch.zeros(rows, cfg.hidden_size, dtype=model.dtype, device=self.device)  # [rows, D]
            self.row_draft = torch.zeros(rows, MAX_LOOKUP, dtype=torch.long, device=self.device)  # [rows, L]: lookup chains
            # heads with state (Hydra++) see the prompt and the tokens of plain steps only when
            # speculation resumes (step.catch_up): the hidden states wait here, so a prefill and a
            # plain step cost what they cost headless
            self.row_deferred = (torch.zeros(rows, self.row_len, cfg.hidden_size, dtype=model.dtype, device=self.device)
                                 if self.head_state is not None else None)  # [rows, row_len, D]
        self._rows: list[_Live | None] = [None] * rows  # row -> running request
        # kept session KV is bounded so that an idle row padding a fixed-shape step keeps its tree
        # slots in the row and its positions in the model's context (runner.py); tokens past
        # max_seq_len - 1 could never be reused anyway (a next prompt is shorter)
        self.keep_cap = max(0, min(self.max_seq_len - 1, self.max_pos - 1 - n_max))
        # prompt tokens (padding included) one prefill forward may take: batched prefill saves the
        # GPU's per-forward launch cost; a CPU's forward is compute-bound, so it prefills one by one
        self.prefill_tokens = prefill_tokens if prefill_tokens is not None else (8192 if self.device.type == "cuda" else 0)
        # admission coalescing (see _admit_now); a CPU prefills one by one, so nothing to gain there
        self.admit_wait_steps = admit_wait_steps if admit_wait_steps is not None else (16 if self.prefill_tokens else 0)
        self.admit_group = max(1, self.pool.max_active // 4)
        # every step and prefill runs at fixed shapes (runner.py): as CUDA graphs on a GPU unless
        # graphs=False, eagerly elsewhere
        capture = self.device.type == "cuda" if graphs is None else graphs
        self.runner = Runner(model, heads, self._row_state(), self.pool.max_active, self.max_seq_len,
                             self.prefill_tokens, capture=capture)
        self.meter = AcceptanceMeter(self._priors())
        self.cost = StepCostModel(step_cost)
        self._sampling_key: tuple = ()
        self._sampling: BatchSampling | None = None
        self._choice: dict = {}
        self._memo: tuple | None = None  # ((batch, auto rows), step, tree, reason, rates): see _choose
        self._steps = 0
        self._tree_steps: collections.Counter = collections.Counter()  # tree -> steps run with it
        self._time = {"prefill": 0.0, "prefills": 0, "step": 0.0, "busy": 0.0, "catch_up": 0.0, "catch_ups": 0}
        self._last_spec_step = 0
        self._speculating = False  # the last step used a tree
        self._plain_at: dict[int, int] = {}  # batch bucket -> last plain step (see _choose)
        self._last_error: str | None = None
        # threading: _mu guards the inbox (waiting queue, cancels, ids); _step_lock the decode state
        self._mu = threading.Lock()
        self._wake = threading.Condition(self._mu)
        self._step_lock = threading.RLock()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._cancels: set[str] = set()
        self._live: dict[str, _Live] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _priors(self) -> dict[str, float]:
        """Each tree's expected acceptance before any is measured: from the heads' own held-out
        accuracy table (heads.json "rank_accuracy", written by `medusa tree --heads`) when they
        ship one, else from a generic profile (tree.prior_accuracies)."""
        table = self.heads.config.extra.get("rank_accuracy") if self.heads is not None else None
        out = {}
        for n, t in self.trees.items():
            ranks = 1 + max((r for p in t.paths for r in p), default=0)
            if table and len(table) >= t.max_depth:  # ranks past the table's count as never right
                acc = [[row[r] if r < len(row) else 0.0 for r in range(ranks)] for row in table]
            else:
                acc = prior_accuracies(max(t.max_depth, 1), max(10, ranks))
            out[n] = expected_accept_length(t.paths, acc) + LOOKUP_PRIOR_16 * min(t.lookup, 16) / 16
        return out

    def _row_state(self) -> RowState:
        return RowState(self.cache, self.row_start, self.row_root, self.row_hidden, self.head_state, self.pool.rows,
                        self.row_deferred, self.row_draft)

    def _trees(self, heads, tree, trees) -> tuple[dict[str, Tree], Tree]:
        """The trees a step may use ("ar" always) and the default one (speculation="on")."""
        ar = load_tree("ar")
        if heads is None:
            return {"ar": ar.to(self.device)}, ar.to(self.device)
        depth = heads.config.num_heads
        base = tree if isinstance(tree, Tree) else load_tree(tree or DEFAULT_TREE)
        if trees is None:
            named = (load_tree(n) for n in NAMED_TREES if n != "ar")
            trees = {t.name: t for t in named if t.max_depth <= depth}
        out = {"ar": ar, **dict(trees), base.name: base}
        for t in list(out.values()):  # a step with a sampled row takes a lookup tree's heads' nodes alone
            if t.lookup:
                out.setdefault(t.heads_only.name, t.heads_only)
        for t in out.values():
            if t.max_depth > depth:
                raise TreeError(f"tree {t.name} is {t.max_depth} deep but the heads guess only {depth} tokens ahead")
        out = {n: t.to(self.device) for n, t in out.items()}  # tree buffers live on the model's device
        return out, out[base.name]

    # -------------------------------------------------------------- public API
    def submit(self, request: Request) -> RequestHandle:
        self._validate(request)
        live = _Live(request, RequestHandle(self, request.request_id),
                     set(self.eos if request.stop_token_ids is None else request.stop_token_ids),
                     time.perf_counter(), self._uniforms(request.sampling))
        live.queued_step = self._steps
        with self._wake:
            if request.request_id in self._live:
                raise RequestError(f"request id {request.request_id!r} is already in flight")
            self._live[request.request_id] = live
            self._waiting.append(live)
            self._wake.notify()
        return live.handle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="medusa-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler thread; requests still in flight end with "cancelled"."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock, torch.inference_mode():
            with self._mu:
                self._cancels.update(self._live)
            self._apply_cancels()

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def step(self) -> bool:
        """One scheduler iteration; False when there was nothing to do."""
        with self._step_lock, torch.inference_mode():
            t0 = time.perf_counter()
            did = self._apply_cancels()
            did |= self._admit()
            if self.pool.n_active:
                self._decode()
                did = True
            if did:
                self._time["busy"] += time.perf_counter() - t0
            return did

    def warmup(self, max_kv_len: int | None = None, trees: list[str] | None = None, progress=None,
               measure: bool = True) -> int:
        """Prepare for traffic; call it before the first request (it waits for running rows).
        1. With CUDA graphs: capture the greedy step of every batch bucket x tree (default: all
           the engine's trees) x KV bucket up to max_kv_len (default: max_seq_len), and the
           prefill of every (rows, prompt length) bucket up to max_kv_len (timing its replay, for
           the split of admitted prompts into forwards), so that no request waits for a capture
           (sampled steps are captured on first use).
        2. measure (with draft heads): time one step of each batch bucket x tree on idle rows and
           give the times to the adaptive policy, which then never spends a request's step on
           finding a cost out. Per bucket, trees are timed smallest first; one that could not
           beat plain decoding even at the time of the last smaller tree is skipped.
        progress(done, total), if given, is called as work is done. Returns the graphs captured."""
        names = list(trees or self.trees)
        for n in names:
            if n not in self.trees:
                raise RequestError(f"unknown tree {n!r}: the engine has {', '.join(self.trees)}")
        limit = min(max_kv_len or self.max_seq_len, self.max_seq_len)
        timer = self.runner
        todo = []  # captures, each a call returning whether it captured a graph
        if timer.capture:
            for n in names:
                tree = self.trees[n]
                kvs = sorted({timer.kv_len(k, tree.num_nodes) for k in [*range(0, limit, 64), limit]})
                todo += [lambda t=tree, b=b, kv=kv: timer.prepare_step(t, b, kv, self._idle_lengths(b))
                         for b in timer.buckets for kv in kvs]
            todo += [lambda R=R, Tb=Tb: timer.prepare_prefill(R, Tb, measure=True)
                     for R, Tb in timer.stage.shapes(limit)]
        timed = sorted({"ar", *names}, key=lambda n: self.trees[n].num_nodes)
        if not measure or self.heads is None or len(timed) < 2:
            timed = []
        total = len(todo) + len(timer.buckets) * len(timed)
        while True:
            with self._step_lock, torch.inference_mode():
                if self.pool.n_active == 0:  # idle rows only; nothing is admitted while the lock is held
                    return self._prepare(timer, todo, timed, limit, total, progress)
            if self._thread is None:
                self.step()  # no scheduler thread: finish the running rows here
            else:
                time.sleep(0.01)

    def _idle_lengths(self, b: int) -> list[int]:
        """The valid KV length of each of rows 0 .. b-1 (warm-up steps write only past it)."""
        return [self.pool.length[r] for r in range(b)]

    def _prepare(self, timer: Runner, todo: list, timed: list[str], limit: int, total: int, progress) -> int:
        done = captured = 0
        for job in todo:
            captured += job()
            done += 1
            if progress is not None:
                progress(done, total)
        for b in timer.buckets:
            plain = last = None
            for n in timed:
                tree = self.trees[n]
                done += 1
                if plain is not None and last >= self.meter.optimistic(n) * plain:
                    continue  # costs at least `last`: cannot beat plain decoding
                kv = timer.kv_len(min(limit, 256), tree.num_nodes)
                last = timer.time_step(tree, b, kv, self._idle_lengths(b))
                plain = last if plain is None else plain
                self.cost.seed(b, tree.num_nodes, last)
                if progress is not None:
                    progress(done, total)
        if progress is not None:
            progress(total, total)
        return captured

    def health(self) -> dict:
        """scheduler: whether the scheduler thread runs (None: none was started, callers drive
        `step`); last_error: the last step failure (its requests ended with "error")."""
        t = self._thread
        return {"scheduler": None if t is None else t.is_alive(), "last_error": self._last_error}

    def load(self) -> int:
        with self._mu:
            return len(self._live)

    def stats(self) -> dict:
        with self._mu:
            waiting = len(self._waiting)
            live = len(self._live)
        p = self.pool
        return {
            "running": p.n_active, "waiting": waiting, "load": live,
            "max_batch": p.max_active, "max_seq_len": self.max_seq_len,
            "kv_rows": p.rows, "kv_rows_used": p.n_active, "kv_rows_kept": p.kept, "kv_rows_free": p.free,
            "sessions_kept": p.kept, "steps": self._steps, "steps_by_tree": dict(self._tree_steps),
            "trees": {n: t.num_nodes for n, t in self.trees.items()},
            "acceptance": {n: round(self.meter.expected(n), 3) for n in self.trees},
            "speculation": dict(self._choice),
            "step_mode": "graphs" if self.runner.capture else "eager",
            # where the scheduler's time went: prefill forwards, verification steps (GPU time included:
            # each ends in a host sync), Hydra++ catch-ups (host time), and the whole of its busy
            # iterations (the rest is bookkeeping)
            "time_s": {k: round(self._time[k], 3) for k in ("prefill", "step", "catch_up", "busy")},
            "prefill_forwards": self._time["prefills"],
            "catch_ups": self._time["catch_ups"],
            "graphs_captured": self.runner.captures("step"),
            "prefill_graphs_captured": self.runner.captures("prefill"),
            "last_error": self._last_error,
        }

    # -------------------------------------------------------------- submission helpers
    def _validate(self, r: Request) -> None:
        if not isinstance(r, Request):
            raise RequestError("submit() takes a Request")
        if not r.prompt_ids:
            raise RequestError("the prompt is empty")
        if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= self.vocab:
            raise RequestError("prompt holds token ids outside the vocabulary")
        if r.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        total = len(r.prompt_ids) + r.max_new_tokens
        if total > self.max_seq_len:
            raise RequestError(f"prompt ({len(r.prompt_ids)} tokens) + max_new_tokens ({r.max_new_tokens}) = {total} "
                               f"exceeds the engine's max_seq_len of {self.max_seq_len} tokens")
        if r.speculation not in SPECULATION:
            raise RequestError(f"speculation must be one of {', '.join(SPECULATION)}, got {r.speculation!r}")
        if not isinstance(r.sampling, SamplingParams):
            raise RequestError("sampling must be a SamplingParams")
        if any(not s for s in r.stop_sequences):
            raise RequestError("stop sequences must be non-empty")

    def _uniforms(self, p: SamplingParams) -> _Uniforms | None:
        if p.greedy:
            return None
        return _Uniforms(p.seed if p.seed is not None else secrets.randbits(63), self.device)

    def _cancel(self, request_id: str) -> None:
        with self._wake:
            if request_id not in self._live:
                return
            self._cancels.add(request_id)
            self._wake.notify()
        if self._step_lock.acquire(blocking=False):  # free the row now unless a step is running
            try:
                with torch.inference_mode():
                    self._apply_cancels()
            finally:
                self._step_lock.release()

    # -------------------------------------------------------------- scheduler
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._waiting or self._cancels or self.pool.n_active):
                    self._wake.wait(0.5)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug must not leave clients waiting forever
                logging.getLogger(__name__).exception("engine step failed; failing the requests in flight")
                self._fail_all(e)

    def _fail_all(self, exc: Exception) -> None:
        with self._step_lock, torch.inference_mode():
            for live in [x for x in self._rows if x is not None]:
                self._finish(live, "error", keep=False)
            with self._mu:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for live in waiting:
                self._finish(live, "error", keep=False)
            for sid in list(self.pool.lru):
                self.pool.drop_session(sid)
        self._last_error = repr(exc)

    def _apply_cancels(self) -> bool:
        with self._mu:
            ids, self._cancels = self._cancels, set()
            waiting = [x for x in self._waiting if x.req.request_id in ids]
            for x in waiting:
                self._waiting.remove(x)
        for x in waiting:
            self._finish(x, "cancelled", keep=False)
        running = [x for x in self._rows if x is not None and x.req.request_id in ids]
        for x in running:
            self._finish(x, "cancelled", keep=False)
        return bool(waiting or running)

    def _admit(self) -> bool:
        """Admit waiting requests while rows are free, then prefill them in groups of consecutive
        rows, one padded forward each. Fresh prompts come first, sorted by length and cut where
        the padding saved outweighs a forward's fixed cost (staging.plan_groups); requests
        continuing a kept session follow, joining the last group while it fits."""
        if not self._admit_now():
            return False
        with self._mu:
            batch = [self._waiting.popleft()
                     for _ in range(min(len(self._waiting), self.pool.max_active - self.pool.n_active))]
        if not batch:
            return False
        batch.sort(key=lambda x: (x.req.session_id in self.pool.lru, len(x.req.prompt_ids)))  # stable: FIFO ties
        admitted: list[_Live] = []
        for live in batch:  # each takes the next row: the admitted rows are consecutive, in this order
            adm = self.pool.admit(live.req.request_id, live.req.prompt_ids, live.req.session_id)
            self._apply_swaps(adm.swaps)
            live.row, live.reused = adm.row, adm.reused
            self._rows[adm.row] = live
            admitted.append(live)
        fresh = next((i for i, x in enumerate(admitted) if x.reused), len(admitted))
        groups: list[list[_Live]] = []
        i = 0
        for k in plan_groups([len(x.req.prompt_ids) for x in admitted[:fresh]], self._prefill_cost):
            groups.append(admitted[i:i + k])
            i += k
        for live in admitted[fresh:]:
            if groups and self._fits(groups[-1] + [live]):
                groups[-1].append(live)
            else:
                groups.append([live])
        t0 = time.perf_counter()
        roots = [r for g in groups for r in self._prefill(g)]
        self._time["prefill"] += time.perf_counter() - t0
        self._time["prefills"] += len(groups)
        for live in admitted:  # the prefilled KV is valid now: a release emitting below swaps rows with their lengths
            self.pool.length[live.row] = len(live.req.prompt_ids)
        now = time.perf_counter()
        for live, root in zip(admitted, roots):  # emit only now: a request that ends frees (swaps) rows
            live.t_first = now
            self._emit(live, [root])
        return bool(admitted)

    def _admit_now(self) -> bool:
        """Coalesce admissions while rows run: every prefill forward has a fixed cost (a graph
        replay and the copy of its KV on a GPU, plus the draft heads' eager prefix layer while the
        engine speculates), so admission waits until admit_group requests (max_batch / 4) can be
        admitted together (as many waiting and as many free rows) or the oldest has waited
        admit_wait_steps steps (16; TGI's max-waiting-tokens idea). Without running rows, or with
        admit_wait_steps 0, admission is immediate."""
        if not self.pool.n_active or not self.admit_wait_steps:
            return True
        with self._mu:
            if not self._waiting:
                return False
            waiting, oldest = len(self._waiting), self._waiting[0].queued_step
        room = self.pool.max_active - self.pool.n_active
        # a deep queue waits for room too: rows freed one at a time would each cost a forward
        return min(waiting, room) >= self.admit_group or self._steps - oldest >= self.admit_wait_steps

    def _prefill_cost(self, k: int, T: int) -> float | None:
        """One prefill forward's cost for plan_groups: k fresh prompts of up to T tokens."""
        return self.runner.prefill_cost(k, T)

    def _fits(self, group: list[_Live]) -> bool:
        T = max(len(x.req.prompt_ids) - x.reused for x in group)
        top = max(x.reused for x in group) + T  # padding slots and positions stay inside the row and context
        if top > min(self.row_len, self.max_pos):
            return False
        if not any(x.reused for x in group):  # padded to its bucket
            return self.runner.prefill_shape(len(group), T) is not None
        return len(group) * T <= self.prefill_tokens

    def _apply_swaps(self, swaps: list[Swap]) -> None:
        for s in swaps:
            swap_cache_rows(self.cache, s)
            swap_state_rows(self.head_state, s.a, s.b, self.pool.rows)
            for t in (self.row_start, self.row_root, self.row_hidden):
                t[[s.a, s.b]] = t[[s.b, s.a]]
            if self.row_deferred is not None:  # only the valid slots matter (as for the KV)
                d = self.row_deferred
                tmp = d[s.a, : s.len_a].clone()
                d[s.a, : s.len_b] = d[s.b, : s.len_b]
                d[s.b, : s.len_a] = tmp
            self._rows[s.a], self._rows[s.b] = self._rows[s.b], self._rows[s.a]
            for r in (s.a, s.b):
                if self._rows[r] is not None:
                    self._rows[r].row = r

    def _prefill(self, group: list[_Live]) -> list[int]:
        """One prefill forward over the group's rows (consecutive), prompts right-padded. Returns
        each row's first token (the caller emits them)."""
        dev = self.device
        r0, k = group[0].row, len(group)
        new = [x.req.prompt_ids[x.reused:] for x in group]
        T = max(map(len, new))
        tokens = torch.tensor([t + [0] * (T - len(t)) for t in new], dtype=torch.long, device=dev)  # [k, T]
        lengths = torch.tensor([len(t) for t in new], dtype=torch.long, device=dev)  # [k]
        sampling = BatchSampling.stack([x.req.sampling for x in group], dev)
        u = None
        if sampling.any_random:
            zero = torch.zeros(1, device=dev)
            u = torch.stack([x.uniforms.at(0, torch.zeros(1, dtype=torch.long, device=dev), 0)
                             if x.uniforms is not None else zero for x in group])  # [k, 1]
        start = torch.tensor([x.reused for x in group], dtype=torch.long, device=dev)
        # while the engine decodes plainly, the prompt waits in row_deferred for speculation to
        # resume (step.catch_up); while it speculates, the heads see it now (only these rows)
        roots, deferred = self.runner.prefill(r0, tokens, start, lengths, sampling, u, defer=not self._speculating)
        for x in group:  # a reused prefix was seen in the session's earlier turns
            x.seen = x.reused if deferred else len(x.req.prompt_ids)
        return roots.tolist()

    def _catch_up(self, lo: int, seen: list[int], committed: list[int]) -> None:
        """Show the draft heads of rows lo .. lo+len(seen)-1 the hidden states plain steps deferred."""
        t0 = time.perf_counter()
        hi = lo + len(seen)
        hs = state_rows(self.head_state, lo, hi, self.pool.rows)
        catch_up(self.heads, hs, self.row_deferred[lo:hi], seen, committed)
        write_back(self.head_state, hs, lo, hi, self.pool.rows)
        self._time["catch_up"] += time.perf_counter() - t0  # host time: the GPU's runs on into the next step
        self._time["catch_ups"] += 1

    def _batch_sampling(self, lives: list[_Live]) -> BatchSampling:
        key = tuple(id(x) for x in lives)
        if key != self._sampling_key:
            self._sampling = BatchSampling.stack([x.req.sampling for x in lives], self.device)
            self._sampling_key = key
        return self._sampling

    def _choose(self, lives: list[_Live]) -> Tree:
        """The tree of this step (one per step for the whole batch), recorded for stats()."""
        n = len(lives)
        modes = [x.req.speculation for x in lives]
        rates = None
        if self.heads is None:
            name, reason = "ar", "no draft heads"
        elif all(m == "off" for m in modes):
            name, reason = "ar", "every row has speculation off"
        elif "on" in modes:
            name, reason = self.default_tree.name, "a row asked for speculation on: the default tree"
        elif (self._memo is not None and self._memo[0] == (n, modes.count("auto"))
              and self._steps - self._memo[1] < CHOICE_STEPS):
            # a batch of the same size and switches keeps its choice a few steps: working it out
            # costs host time while the GPU waits (0.1 ms a step on an H200's host, 4% of a batch-1
            # Hydra++ step), and the measurements it rests on move slowly
            name, reason, rates = self._memo[2:]
        else:
            # acceptance does not depend on the batch: a tree not yet measured on `explore` rows is
            # expected to do what the heads' accuracy table says (AcceptanceMeter.optimistic), so a
            # promising tree gets tried; a large batch measures it in one step
            options = [TreeOption(t, tr.num_nodes, self.meter.optimistic(t)) for t, tr in self.trees.items()]
            c: Choice = choose_tree(n, modes.count("auto"), options, self.cost, SPEC_MARGIN)
            name, reason, rates = c.tree, c.reason, c.rates
            if name == "ar" and self._steps - self._last_spec_step >= REFRESH_EVERY:
                # acceptance is only measured while speculating: re-measure now and then (with the
                # tree closest to winning), or one bad stretch would keep the engine plain forever
                spec = [(r, t) for t, r in rates.items() if r is not None and self.trees[t].num_nodes > 1]
                name = max(spec)[1] if spec else self.default_tree.name
                reason = f"re-measuring acceptance with {name} ({REFRESH_EVERY} plain steps in a row)"
            elif name != "ar" and self._steps - self._plain_at.get(batch_bucket(n), -REFRESH_EVERY) >= REFRESH_EVERY:
                # the other way round: a step's cost grows with the contexts, and a warm-up seed of
                # plain decoding's cost, scaled by how the trees' own costs grew, can be far off
                name, reason = "ar", f"re-measuring plain decoding's step cost at batch {batch_bucket(n)}"
            rates = {k: (round(v, 1) if v is not None else None) for k, v in rates.items()}
            # keep only a choice resting on measurements (not a step that explores a cost or an
            # acceptance, or re-measures)
            settled = (c.tokens_per_s > 0 and name == c.tree
                       and (self.trees[name].num_nodes == 1 or self.meter.count.get(name, 0) >= self.meter.explore))
            self._memo = ((n, modes.count("auto")), self._steps, name, reason, rates) if settled else None
        tree = self.trees[name]
        if tree.num_nodes > 1 and max(x.kv_len for x in lives) + tree.accept_depth >= self.max_pos:
            tree, reason = self.trees["ar"], "a row is at the end of the model's context: plain decoding"
        self._choice = {"tree": tree.name, "batch": n, "reason": reason, "step": self._steps}
        if rates is not None:
            self._choice["rates_tokens_per_s"] = rates
        return tree

    def _decode(self) -> None:
        t_in, caught = time.perf_counter(), self._time["catch_up"]
        n = self.pool.n_active
        lives = self._rows[:n]
        tree = self._choose(lives)
        dev = self.device
        sampling = self._batch_sampling(lives)
        if tree.lookup and sampling.any_random:  # sampling stays exact only while siblings carry distinct tokens
            tree = self.trees[tree.heads_only.name]
            self._choice["tree"] = tree.name
            self._choice["reason"] += "; a sampled row: without the lookup chain"
        if tree.lookup:
            self._set_drafts(lives, tree.lookup)
        twin = self._twin.get(tree.name) if n <= SHADOW_BATCH and not sampling.any_random else None
        shadow = self._drafts(lives, twin.lookup) if twin is not None else None
        N, D = tree.num_nodes, tree.accept_depth
        uniforms = None
        if sampling.any_random:
            depth = tree.depth.to(dev)
            zero = torch.zeros(N, device=dev)
            uniforms = torch.stack([x.uniforms.at(len(x.out), depth, D) if x.uniforms is not None else zero
                                    for x in lives])  # [n, N]: node at depth d predicts output len(out) + d
        off = [x.req.speculation == "off" for x in lives]
        max_accept = None
        if N > 1 and any(off):
            max_accept = torch.tensor([0 if o else D for o in off], dtype=torch.long, device=dev)  # [n]
        committed_max = max(x.kv_len for x in lives)  # known on the host: no sync
        behind = [i for i, x in enumerate(lives) if x.seen < x.kv_len] if N > 1 and self.row_deferred is not None else []
        if behind:  # only the span of rows that are behind (admitted rows sit at the end)
            lo, hi = behind[0], behind[-1] + 1
            self._catch_up(lo, [x.seen for x in lives[lo:hi]], [x.kv_len for x in lives[lo:hi]])
        t0 = time.perf_counter()
        pad = [self.pool.length[r] for r in range(n, self.runner.bucket(n))]
        acc, captured = self.runner.step(tree, n, committed_max, sampling, self._sampling_key, uniforms, max_accept, pad)
        rows = torch.cat([acc.length[:n, None], acc.tokens[:n], acc.path[:n]], 1).tolist()  # one host sync
        dt = time.perf_counter() - t0
        self._time["step"] += dt
        self._speculating = N > 1
        if N > 1:
            self._last_spec_step = self._steps
        else:
            self._plain_at[batch_bucket(n)] = self._steps
        self._steps += 1
        self._tree_steps[tree.name] += 1
        if N > 1:  # rows: [accepted, D + 1 tokens, D + 1 path node ids]
            spec = [row for row, o in zip(rows, off) if not o]
            self.meter.record(tree.name, [row[0] + 1 for row in spec])
            if not sampling.any_typical:
                for sub, inside in self._inside.get(tree.name, ()):
                    self.meter.record(sub, [1 + accepted_within(row[D + 3: D + 3 + row[0]], inside) for row in spec])
        for i, (live, row) in enumerate(zip(lives, rows)):  # before any release swaps rows
            self.pool.length[i] = live.kv_len + row[0] + 1
        for i, (live, row) in enumerate(zip(lives, rows)):
            k = row[0] + 1
            if N > 1:  # the step showed the heads every token it committed
                live.seen = live.kv_len + k
            live.steps += 1
            live.step_tokens += k
            live.tree = tree.name
            if shadow is not None and not off[i]:
                live.shadow.append((len(live.out), shadow[i], row[0]))
            self._emit(live, row[1:1 + k])
            if live.shadow and twin is not None:
                self._shadow(live, twin.name)
        if not captured:  # a capturing step's time is not the step's cost
            # the policy weighs a step's whole cost to the scheduler: choosing the tree, the step,
            # recording acceptance, emitting tokens and finishing requests, less the Hydra++ catch-up
            # (not the step's). At batch 64 on an H200 the host work outside the steps was 1.8 ms
            # per step of the adaptive engine against 0.76 ms of a plain one, and counting only
            # the step made trees look 10% better than plain decoding where they were at parity
            self.cost.record(n, N, time.perf_counter() - t_in - (self._time["catch_up"] - caught))

    def _drafts(self, lives: list[_Live], L: int) -> list[list[int]]:
        """Each row's lookup chain for this step (medusa.decoding.lookup)."""
        drafts = []
        for x in lives:
            if x.lookup is None:  # first step with a lookup chain: index what the row holds so far
                x.lookup = NgramLookup(list(x.req.prompt_ids) + x.out)
            drafts.append(x.lookup.draft(L))
        return drafts

    def _set_drafts(self, lives: list[_Live], L: int) -> None:
        self.row_draft[:len(lives), :L].copy_(torch.tensor(self._drafts(lives, L), dtype=torch.long), non_blocking=True)

    def _shadow(self, live: _Live, twin: str) -> None:
        """Measure the lookup tree `twin` on steps that ran its heads' nodes alone: once the tokens a
        step's chain guessed are known, the chain would have accepted its guesses up to the first
        wrong one, and the twin's step the longer of that and what the heads accepted. Exact for
        greedy rows (their tokens do not depend on the tree); steps near a request's end, whose
        guesses are never all known, are dropped. Without this, a lookup tree that measured low on
        one stretch of text would never run, and so never be measured, again; with it, both trees
        are compared on the same tokens."""
        done = []
        while live.shadow and live.shadow[0][0] + len(live.shadow[0][1]) <= len(live.out):
            at, draft, heads = live.shadow.pop(0)
            m = 0
            while m < len(draft) and at + m < len(live.out) and draft[m] == live.out[at + m]:
                m += 1
            done.append(1 + max(m, heads))
        if done:
            self.meter.record(twin, done)

    # -------------------------------------------------------------- output
    def _emit(self, live: _Live, new: list[int]) -> None:
        req = live.req
        before = len(live.out)
        live.out.extend(new)
        if live.lookup is not None:
            live.lookup.extend(new)
        if live.row >= 0:
            self.pool.length[live.row] = live.kv_len
        limit = req.max_new_tokens
        view = live.out[:limit]
        cut = stop_cut(view, min(before, len(view)), live.eos, req.stop_sequences)
        if cut is None and len(live.out) >= limit:
            cut = (limit, "length")
        if cut is None:
            live.handle._push(TokenEvent(req.request_id, live.out[live.sent:], produced=len(new)))
            live.sent = len(live.out)
            return
        self._finish(live, cut[1], keep=True, end=cut[0], produced=len(new))

    def _finish(self, live: _Live, reason: str, keep: bool, end: int | None = None, produced: int = 0) -> None:
        req = live.req
        end = live.sent if end is None else end
        if live.row >= 0:
            r, live.row = live.row, -1
            keep_tokens = None
            if keep and req.session_id is not None:
                keep_tokens = (list(req.prompt_ids) + live.out[:-1])[:self.keep_cap]  # committed KV slots
                if self.row_deferred is not None and live.seen < len(keep_tokens):  # the next turn's heads need them
                    self._catch_up(r, [live.seen], [len(keep_tokens)])
            self._rows[r] = None
            self._apply_swaps(self.pool.release(r, req.session_id if keep_tokens else None, keep_tokens))
        now = time.perf_counter()
        stats = RequestStats(
            prompt_tokens=len(req.prompt_ids), new_tokens=end, steps=live.steps,
            mean_accepted=live.step_tokens / live.steps if live.steps else 0.0,
            reused_tokens=live.reused, ttft_s=(live.t_first or now) - live.t_submit,
            seconds=now - live.t_submit, tree=live.tree)
        with self._mu:
            self._live.pop(req.request_id, None)
        live.handle._push(TokenEvent(req.request_id, live.out[live.sent:end], reason, stats, produced))
        live.sent = end
