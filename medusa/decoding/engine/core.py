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
The tree is chosen per step for the whole batch (policy.py): "auto" rows follow the load-
adaptive choice, an "on" row makes the step use the engine's default tree, and "off" rows ride
along in the same forward with their acceptance capped at the root (plain decoding; their
extra tree nodes are wasted compute, which the policy counts).

Sampled rows draw from a per-request seeded stream of uniforms indexed by output position
(token j of a request always uses uniform j), so a sampled request's tokens do not depend on
its batch-mates, on the tree chosen, or on whether it speculated.

The package's files: requests.py (Request, RequestHandle, TokenEvent, RequestStats),
scheduler.py (inbox, admission, prefill grouping, row swaps), policy.py (the tree choice and
what steps teach it), trees.py (the trees it may step with), warmup.py (graphs and step costs
before traffic), beams.py (a beam-search request's K rows: they step with the batch, beam.py
scores them), output.py (tokens to streams, finished requests), core.py (this: the Engine,
its rows, one step). Every step and prefill, and every other read or change of
the replica's device state, runs through runner.py (so a tensor-parallel replica can replay
them on every rank: a model with a `replica` driver, medusa.parallel.replica).

This package knows token ids only (never text), and nothing of transports or tenants: session
ids arrive already namespaced. All decoding goes through medusa.decoding.step."""
from __future__ import annotations

import collections
import secrets
import threading
import time

import torch

from medusa.decoding.engine.beams import BeamMember, Beams
from medusa.decoding.engine.output import Output
from medusa.decoding.engine.policy import Policy
from medusa.decoding.engine.requests import Live, Request, RequestHandle, Uniforms, validate, validate_beams
from medusa.decoding.engine.scheduler import Scheduler
from medusa.decoding.engine.trees import engine_trees
from medusa.decoding.engine.warmup import Warmup
from medusa.decoding.graphs import AUTO
from medusa.decoding.kv_pool import RowPool
from medusa.decoding.logprobs import host_entries
from medusa.decoding.lookup import NgramLookup
from medusa.decoding.runner import RowState, Runner
from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.tree import MAX_LOOKUP, Tree
from medusa.errors import RequestError

DEFAULT_MAX_SEQ_LEN = 2048


class Engine(Scheduler, Warmup, Beams, Output):
    """Continuous-batching speculative decoder. Thread-safe `submit`/`cancel`; one scheduler
    (a background thread after `start()`, or the caller through `step()`)."""

    def __init__(self, model, heads=None, tree: Tree | str | None = None, *, max_batch: int = 16,
                 kv_budget_tokens: int | None = None, max_seq_len: int | None = None,
                 trees: dict[str, Tree] | None = None, step_cost: dict | None = None,
                 graphs: bool | None = None, prefill_tokens: int | None = None,
                 admit_wait_steps: int | None = None, compile_mode: str | None = AUTO):
        """compile_mode: torch.compile the model's per-layer pieces inside the step graphs (a
        torch.compile mode, "" for the default; runner.py), None: as written, AUTO: where it was
        measured to pay (graphs.compile_choice: graphed steps of one row)."""
        if max_batch < 1:
            raise RequestError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.heads = model, heads
        cfg = model.cfg
        self.device = model.device
        self.eos = tuple(cfg.eos_token_ids)
        self.vocab = cfg.vocab_size
        self.max_pos = cfg.max_position_embeddings
        self.trees, self.default_tree = engine_trees(heads, tree, trees, self.device)
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, self.max_pos)
        n_max = max(t.num_nodes for t in self.trees.values())
        self.row_len = self.max_seq_len + n_max + 1  # room for the last step's tree slots
        rows = max_batch if kv_budget_tokens is None else kv_budget_tokens // self.max_seq_len
        if rows < 1:
            raise RequestError(f"kv_budget_tokens={kv_budget_tokens} holds no row of max_seq_len={self.max_seq_len} tokens")
        self.pool = RowPool(rows, max_batch)
        with torch.inference_mode():
            self.cache = model.new_cache(rows, self.row_len)  # kv [L, 2, rows, Hkv, row_len, Dh]
            # lazy: heads with state (Hydra++) may keep what prompts and plain steps show them until
            # speculation resumes, so a plain step costs what it costs headless (heads.prepare)
            self.head_state = heads.new_state(rows, self.row_len, model, lazy=True) if heads is not None else None
            self.row_start = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows]
            self.row_root = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows]
            self.row_hidden = torch.zeros(rows, cfg.hidden_size, dtype=model.dtype, device=self.device)  # [rows, D]
            self.row_draft = torch.zeros(rows, MAX_LOOKUP, dtype=torch.long, device=self.device)  # [rows, L]: lookup chains
        self._rows: list[Live | None] = [None] * rows  # row -> running request (a beam request: a BeamMember per row)
        self._beam_runs: dict = {}  # request id -> BeamRun of the beam requests running (engine/beams.py)
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
                             self.prefill_tokens, capture=capture, compile_mode=compile_mode)
        self.policy = Policy(self.trees, self.default_tree, heads, step_cost, self.max_pos)
        self.meter, self.cost = self.policy.meter, self.policy.cost  # what the policy has measured
        self._sampling_key: tuple = ()
        self._sampling: BatchSampling | None = None
        self._time = {"prefill": 0.0, "prefills": 0, "step": 0.0, "busy": 0.0}
        self._last_error: str | None = None
        self._accepted_pos: list[int] = []  # [i]: speculative row-steps that accepted a draft token at position i
        # threading: _mu guards the inbox (waiting queue, cancels, ids); _step_lock the decode state
        self._mu = threading.Lock()
        self._wake = threading.Condition(self._mu)
        self._step_lock = threading.RLock()
        self._waiting: collections.deque[Live] = collections.deque()
        self._cancels: set[str] = set()
        self._live: dict[str, Live] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        replica = getattr(model, "replica", None)
        if replica is not None:  # rank 0 of a tensor-parallel replica: every rank builds this engine (medusa.parallel.replica)
            replica.adopt(self, dict(tree=tree, max_batch=max_batch, kv_budget_tokens=kv_budget_tokens,
                                     max_seq_len=max_seq_len, trees=trees, step_cost=step_cost, graphs=graphs,
                                     prefill_tokens=prefill_tokens, admit_wait_steps=admit_wait_steps,
                                     compile_mode=compile_mode))

    def _row_state(self) -> RowState:
        return RowState(self.cache, self.row_start, self.row_root, self.row_hidden, self.head_state, self.pool.rows,
                        self.row_draft)

    # -------------------------------------------------------------- public API
    def submit(self, request: Request) -> RequestHandle:
        validate(request, self.vocab, self.max_seq_len)
        stops = self.eos if request.stop_token_ids is None else request.stop_token_ids
        if request.beams != 1:
            validate_beams(request, len(stops))
            if request.beams > self.pool.max_active:
                raise RequestError(f"beams ({request.beams}) exceed the engine's max_batch of {self.pool.max_active} rows")
        live = Live(request, RequestHandle(self, request.request_id), set(stops), time.perf_counter(),
                    self._uniforms(request.sampling))
        live.queued_step = self.policy.steps
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
        if not torch.is_inference_mode_enabled():  # the scheduler thread runs in it already
            with torch.inference_mode():
                return self.step()
        with self._step_lock:
            t0 = time.perf_counter()
            did = self._apply_cancels()
            did |= self._admit()
            if self.pool.n_active:
                self._decode()
                did = True
            if did:
                self._time["busy"] += time.perf_counter() - t0
            return did

    @property
    def threaded(self) -> bool:
        """Whether a scheduler thread runs the engine (else iterating a handle drives `step`)."""
        return self._thread is not None

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
            "sessions_kept": p.kept, "steps": self.policy.steps, "steps_by_tree": dict(self.policy.tree_steps),
            "trees": {n: t.num_nodes for n, t in self.trees.items()},
            "acceptance": {n: round(self.meter.expected(n), 3) for n in self.trees},
            "accepted_per_pos": list(self._accepted_pos),
            "speculation": dict(self.policy.choice),
            "step_mode": "graphs" if self.runner.capture else "eager",
            # where the scheduler's time went: prefill forwards, verification steps (GPU time included:
            # each ends in a host sync), the heads' catch-ups before steps (Hydra++ after plain
            # steps; host time, part of the steps' time), and the whole of its busy iterations
            # (the rest is bookkeeping)
            "time_s": {"prefill": round(self._time["prefill"], 3), "step": round(self._time["step"], 3),
                       "catch_up": round(self.runner.catch_ups["seconds"], 3), "busy": round(self._time["busy"], 3)},
            "prefill_forwards": self._time["prefills"],
            "catch_ups": self.runner.catch_ups["calls"],
            "graphs_captured": self.runner.captures("step"),
            "prefill_graphs_captured": self.runner.captures("prefill"),
            "last_error": self._last_error,
        }

    # -------------------------------------------------------------- submission helpers
    def _uniforms(self, p: SamplingParams) -> Uniforms | None:
        if p.greedy:
            return None
        return Uniforms(p.seed if p.seed is not None else secrets.randbits(63), self.device)

    def cancel(self, request_id: str) -> None:
        """Stop a request (RequestHandle.cancel); unknown or finished ids are ignored."""
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

    def _batch_sampling(self, lives: list[Live]) -> BatchSampling:
        key = tuple(x.serial for x in lives)
        if key != self._sampling_key:
            self._sampling = BatchSampling.stack([x.req.sampling for x in lives], self.device)
            self._sampling_key = key
        return self._sampling

    def _decode(self) -> None:
        t_in, caught = time.perf_counter(), self.runner.catch_ups["seconds"]
        n = self.pool.n_active
        lives = self._rows[:n]
        policy = self.policy
        tree = policy.choose([x.req.speculation for x in lives], max(x.kv_len for x in lives))
        dev = self.device
        sampling = self._batch_sampling(lives)
        if tree.lookup and sampling.any_random:  # sampling stays exact only while siblings carry distinct tokens
            tree = policy.without_lookup(tree)
        if tree.lookup:
            self._set_drafts(lives, tree.lookup)
        twin = policy.shadowed(tree, n, sampling.any_random)
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
            max_accept = [0 if o else D for o in off]
        committed = [x.kv_len for x in lives]  # known on the host: no sync
        t0 = time.perf_counter()
        pad = [self.pool.length[r] for r in range(n, self.runner.bucket(n))]
        want = [x.req.logprobs for x in lives]
        asked = any(w is not None for w in want)
        beams = bool(self._beam_runs)  # beam rows score the log-probabilities of their paths
        acc, captured = self.runner.step(tree, n, committed, sampling, self._sampling_key, uniforms, max_accept, pad,
                                         logprobs=beams or asked)
        rows = acc.packed.tolist()  # one host sync; rows n .. Bb-1 are padding
        beam_paths = self._beam_paths(lives, rows, acc.logprobs) if beams else {}
        lps = host_entries(acc.logprobs, [r[1:2 + r[0]] for r in rows[:n]], want) if asked else None
        self._time["step"] += time.perf_counter() - t0 - (self.runner.catch_ups["seconds"] - caught)
        policy.ran(tree, n, rows, off, not sampling.any_typical)  # rows: [accepted, D + 1 tokens, D + 1 path ids]
        for i, (live, row) in enumerate(zip(lives, rows)):  # before any release swaps rows (zip stops at n)
            self.pool.length[i] = live.kv_len + row[0] + 1
        for i, (live, row) in enumerate(zip(lives, rows)):
            if isinstance(live, BeamMember):  # scored after the loop (its rows may move meanwhile)
                continue
            k = row[0] + 1
            live.steps += 1
            live.step_tokens += k
            live.tree = tree.name
            if shadow is not None and not off[i]:
                live.shadow.append((len(live.out), shadow[i], row[0]))
            if N > 1 and not off[i]:  # acceptance per draft position (vLLM's spec_decode_num_accepted_tokens_per_pos)
                per_pos = self._accepted_pos
                per_pos.extend([0] * (row[0] - len(per_pos)))
                for p in range(row[0]):
                    per_pos[p] += 1
            if lps is not None and lps[i] is not None:
                live.logprobs.extend(lps[i])
            self._emit(live, row[1:1 + k])
            if live.shadow and twin is not None:
                policy.shadow(live.shadow, live.out, twin.name)
        if beam_paths:
            self._beam_advance(beam_paths, tree.name)
        if not captured:  # a capturing step's time is not the step's cost
            # the policy weighs a step's whole cost to the scheduler: choosing the tree, the step,
            # recording acceptance, emitting tokens and finishing requests, less the heads' catch-up
            # (not the step's). At batch 64 on an H200 the host work outside the steps was 1.8 ms
            # per step of the adaptive engine against 0.76 ms of a plain one, and counting only
            # the step made trees look 10% better than plain decoding where they were at parity
            self.cost.record(n, N, time.perf_counter() - t_in - (self.runner.catch_ups["seconds"] - caught))

    def _drafts(self, lives: list[Live], L: int) -> list[list[int]]:
        """Each row's lookup chain for this step (medusa.decoding.lookup)."""
        drafts = []
        for x in lives:
            if x.lookup is None:  # first step with a lookup chain: index what the row holds so far
                x.lookup = NgramLookup(list(x.req.prompt_ids) + x.out)
            drafts.append(x.lookup.draft(L))
        return drafts

    def _set_drafts(self, lives: list[Live], L: int) -> None:
        self.runner.set_drafts(self._drafts(lives, L))
