"""The engine's batched step at fixed shapes, so that it can run as a CUDA graph.

The engine keeps its n running rows in pool rows 0 .. n-1 (kv_pool.py). A graph has fixed
shapes, so a step runs over the first Bb rows, Bb the batch bucket of n (1, 2, 4, ... up to the
engine's max batch): rows n .. Bb-1 are idle (free, or holding a kept session's KV) and ride
along as padding. A padding row is made harmless before each step:
  - its start is set to its valid KV length (0 for a free row), so every write of the step
    (the tree's K/V slots, the path commit, the Hydra++ prefix KV) lands past the KV it keeps;
  - it decodes greedily with acceptance capped at the root;
  - its start / root / hidden / head "last" are overwritten, which is harmless: a row's next
    prefill sets them all.
Whatever the padding rows compute is discarded. The engine bounds kept sessions so that a
padding row's tree slots and RoPE positions stay inside the cache and the model's context.

One graph per (tree, Bb, KV bucket, sampling kind), captured on first use. The static inputs
are the engine's own row tensors (views of the first Bb rows), per-bucket sampling buffers,
uniforms and acceptance caps. `capture=False` runs the very same padded step eagerly: the CPU
tests use it to check the padding, and a GPU without graphs could too."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from medusa.decoding.graphs import _Captured, capture_step, kv_bucket
from medusa.decoding.kv_pool import state_rows, write_back
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.step import DecodeState, speculate
from medusa.decoding.tree import Tree
from medusa.decoding.verify import Acceptance
from medusa.model.kv_cache import KVCache

# a padding row's sampling: greedy, no cuts (typical threshold / alpha are unused when greedy)
_PAD = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "typical": False, "threshold": 0.09, "alpha": 0.3}
_FIELDS = tuple(_PAD)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return tuple(out) + (max_batch,)


@dataclass
class _Bucket:
    """Static per-bucket inputs of the step (their addresses are baked into the graphs)."""

    sampling: BatchSampling
    max_accept: torch.Tensor  # [Bb] long
    uniforms: dict[int, torch.Tensor] = field(default_factory=dict)  # N -> [Bb, N]
    loaded: object = None  # key of the sampling rows now in the buffers
    capped: object = None  # (running rows, depth) when max_accept holds the plain cap (no row off)


@dataclass(frozen=True)
class RowState:
    """The engine's per-row tensors over all pool rows (the step reads and updates rows 0 .. Bb-1)."""

    cache: KVCache  # kv [L, 2, rows, Hkv, row_len, Dh]
    start: torch.Tensor  # [rows] long
    root: torch.Tensor  # [rows] long
    hidden: torch.Tensor  # [rows, D]
    head_state: object
    rows: int
    deferred: torch.Tensor | None = None  # [rows, row_len, D]: plain steps' hidden states (step.catch_up)
    draft: torch.Tensor | None = None  # [rows, MAX_LOOKUP] long: lookup chains' tokens (DecodeState.draft)


class BatchGraphs:
    def __init__(self, model, heads, rows: RowState, max_batch: int, capture: bool = True):
        if capture and model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self.model, self.heads, self.rows = model, heads, rows
        self.buckets = batch_buckets(min(max_batch, rows.rows))
        self.capture = capture
        self.graphs: dict[tuple, _Captured] = {}
        self.trees: dict[tuple, Tree] = {}  # device copies the graphs read: they must outlive every replay
        self._buckets: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def kv_len(self, committed_max: int, nodes: int) -> int:
        """Slots the step attends over: a fixed bucket (few graphs) covering every running row."""
        return kv_bucket(committed_max + nodes, self.rows.cache.max_len)

    def _bucket(self, Bb: int) -> _Bucket:
        b = self._buckets.get(Bb)
        if b is None:
            dev = self.rows.start.device
            t = {k: torch.full((Bb,), v, device=dev, dtype=torch.long if k == "top_k" else
                               torch.bool if k == "typical" else torch.float32) for k, v in _PAD.items()}
            b = self._buckets[Bb] = _Bucket(BatchSampling(*(t[k] for k in _FIELDS)),
                                           torch.zeros(Bb, dtype=torch.long, device=dev))
        return b

    def _load(self, b: _Bucket, n: int, sampling: BatchSampling, key) -> BatchSampling:
        if b.loaded != (key, n):
            for name in _FIELDS:
                dst, src = getattr(b.sampling, name), getattr(sampling, name)
                dst[:n].copy_(src)
                dst[n:].fill_(_PAD[name])
            b.loaded = (key, n)
        return self._static(b, sampling.any_random, sampling.any_typical)

    @staticmethod
    def _static(b: _Bucket, any_random: bool = False, any_typical: bool = False) -> BatchSampling:
        """The bucket's static sampling buffers with the step's host-side flags (greedy by default)."""
        return BatchSampling(*(getattr(b.sampling, k) for k in _FIELDS), any_random=any_random, any_typical=any_typical)

    def _view(self, Bb: int) -> DecodeState:
        """The decode state of rows 0 .. Bb-1: views of the engine's row tensors (in-place writes land there)."""
        R = self.rows
        return DecodeState(state_rows(R.cache, 0, Bb, R.rows), R.start[:Bb], R.root[:Bb], R.hidden[:Bb],
                           state_rows(R.head_state, 0, Bb, R.rows), R.draft[:Bb] if R.draft is not None else None)

    def _after(self, Bb: int):
        """Runs after each step (inside a capture too): copies back whatever a head family rebinds
        instead of writing in place."""
        R = self.rows
        return lambda st: write_back(R.head_state, st.head_state, 0, Bb, R.rows)

    def run(self, tree: Tree, n: int, committed_max: int, sampling: BatchSampling, sampling_key,
            uniforms: torch.Tensor | None, max_accept: torch.Tensor | None, pad_start: list[int]) -> tuple[Acceptance, bool]:
        """One step over rows 0 .. n-1 (padded to the bucket). sampling / uniforms [n, N] /
        max_accept [n] are the running rows'; pad_start the valid KV length of each padding row.
        Returns the acceptance of all Bb rows (read rows :n) and whether a graph was captured
        (a step that also captured is not a fair timing)."""
        Bb, N = self.bucket(n), tree.num_nodes
        R = self.rows
        b = self._bucket(Bb)
        s = self._load(b, n, sampling, sampling_key)
        if Bb > n:
            R.start[n:Bb].copy_(torch.tensor(pad_start, dtype=torch.long), non_blocking=True)
        u = None
        if sampling.any_random:
            u = b.uniforms.get(N)
            if u is None:
                u = b.uniforms[N] = torch.zeros(Bb, N, device=R.start.device)
            u[:n].copy_(uniforms)
        cap = None
        if N > 1:
            cap = b.max_accept
            if max_accept is not None:
                cap[:n].copy_(max_accept)
                cap[n:].zero_()
                b.capped = None
            elif b.capped != (n, tree.accept_depth):  # the usual case, unchanged since the last step: no launches
                cap[:n].fill_(tree.accept_depth)
                cap[n:].zero_()
                b.capped = (n, tree.accept_depth)
        kv_len = self.kv_len(committed_max, N)
        if not self.capture:
            state = self._view(Bb)
            acc = speculate(self.model, self.heads, tree, state, s, u, cap, kv_len=kv_len, defer=self._defer(tree, Bb))
            R.start[:Bb], R.root[:Bb], R.hidden[:Bb] = state.start, state.root, state.last_hidden
            self._after(Bb)(state)
            return acc, False
        g, captured = self._graph(tree, Bb, kv_len, s, u, cap)
        g.graph.replay()
        return g.acc, captured

    def _graph(self, tree: Tree, Bb: int, kv_len: int, s: BatchSampling, u: torch.Tensor | None,
               cap: torch.Tensor | None) -> tuple[_Captured, bool]:
        """The graph of (tree, Bb, kv_len, sampling kind), captured over views of rows 0 .. Bb-1
        on first use (a replay needs no views: host time per step)."""
        tkey = (tree.name, tree.paths, tree.lookup)
        key = (tkey, Bb, kv_len, s.any_random, s.any_typical)
        g = self.graphs.get(key)
        if g is not None:
            return g, False
        dtree = self.trees.get(tkey)
        if dtree is None:
            dtree = self.trees[tkey] = tree.to(self.rows.start.device)
        g = self.graphs[key] = capture_step(self.model, self.heads, dtree, kv_len, self._view(Bb), s, u, cap, self.pool,
                                            self._after(Bb), self._defer(tree, Bb))
        self.captures += 1
        return g, True

    def _defer(self, tree: Tree, Bb: int) -> torch.Tensor | None:
        """Plain steps defer the heads' observation (step.speculate) when the engine keeps a buffer."""
        d = self.rows.deferred
        return d[:Bb] if d is not None and tree.num_nodes == 1 else None

    def _idle_state(self, Bb: int, lengths: list[int]) -> DecodeState:
        self.rows.start[:Bb].copy_(torch.tensor(lengths, dtype=torch.long))
        return self._view(Bb)

    def _greedy_graph(self, tree: Tree, Bb: int, kv_len: int) -> tuple[_Captured, bool]:
        b = self._bucket(Bb)
        cap = b.max_accept if tree.num_nodes > 1 else None
        return self._graph(tree, Bb, kv_len, self._static(b), None, cap)

    def prepare(self, tree: Tree, Bb: int, kv_len: int, lengths: list[int]) -> bool:
        """Capture the greedy step for (tree, Bb, kv_len) ahead of traffic, while no row runs.
        lengths: the valid KV length of each of rows 0 .. Bb-1 (their writes land past it).
        Returns whether a graph was captured (False: it existed, or graphs are off)."""
        if not self.capture:
            return False
        self._idle_state(Bb, lengths)
        return self._greedy_graph(tree, Bb, kv_len)[1]

    def time_step(self, tree: Tree, Bb: int, kv_len: int, lengths: list[int], repeats: int = 3) -> float:
        """Median seconds of a greedy step over Bb idle rows (a replay of its graph, or the padded
        step run eagerly), ending in the host sync a real step ends with. Rows must be idle:
        the step writes only past `lengths` and changes nothing else a request needs."""
        b = self._bucket(Bb)
        times = []
        for _ in range(repeats + 1):  # the first run warms up (and captures, with graphs)
            state = self._idle_state(Bb, lengths)
            t0 = time.perf_counter()
            if self.capture:
                g, _ = self._greedy_graph(tree, Bb, kv_len)
                g.graph.replay()
                acc = g.acc
            else:
                acc = speculate(self.model, self.heads, tree, state, self._static(b), None,
                                b.max_accept if tree.num_nodes > 1 else None, kv_len=kv_len, defer=self._defer(tree, Bb))
            acc.length.tolist()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
