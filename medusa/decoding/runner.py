"""The one step runner and its graph cache: every verification step and every prompt forward
of the engine runs here, at fixed shapes, eagerly or as a CUDA graph.

The engine keeps its n running rows in pool rows 0 .. n-1 (kv_pool.py). A step runs over the
first Bb rows, Bb the batch bucket of n (buckets.py): rows n .. Bb-1 are idle (free, or
holding a kept session's KV) and ride along as padding. A padding row is made harmless before
each step:
  - its start is set to its valid KV length (0 for a free row), so every write of the step
    (the tree's K/V slots, the path commit, the Hydra++ prefix KV) lands past the KV it keeps;
  - it decodes greedily with acceptance capped at the root;
  - its start / root / hidden / head "last" are overwritten, which is harmless: a row's next
    prefill sets them all.
Whatever the padding rows compute is discarded. The engine bounds kept sessions so that a
padding row's tree slots and RoPE positions stay inside the cache and the model's context.
Fresh prompts prefill at their (rows, prompt length) bucket through staging buffers
(staging.py); rows continuing a kept session prefill eagerly over the KV they hold.

Each shape is one `GraphKey` (kind, tree, batch bucket, KV bucket, sampling kind, prompt
bucket); with `capture` (a CUDA device) its graph is captured on first use and replayed after,
all in one cache. Without it the very same padded work runs eagerly, so the CPU runs exactly
the shapes and padding a GPU replays. Warm-up timing goes through the same calls.

The runner is the engine's only way to the replica's device state: every call that reads or
changes it (steps, prefills, row swaps, lookup drafts, the Hydra++ catch-up, warm-up captures
and timings) is a method here taking host-side arguments (ints, token lists, sampling params,
trees; uniforms are the one tensor), so a tensor-parallel replica can replay the same calls
on every rank (medusa.parallel.replica wraps these methods; Runner.REPLAYED names them).

The static inputs of the step graphs are the engine's own row tensors (views of the first Bb
rows), per-bucket sampling buffers, uniforms and acceptance caps. This module knows shapes,
buffers and graphs; it knows nothing of requests, stopping or the speculation policy."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from medusa.decoding.buckets import batch_buckets, bucket_of, kv_bucket, kv_round
from medusa.decoding.graphs import AUTO, CompiledBlocks, capture as capture_fn, capture_step, compile_choice
from medusa.decoding.kv_pool import Swap, copy_row, state_rows, swap_cache_rows, swap_state_rows, write_back
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.staging import PrefillStage
from medusa.decoding.step import DecodeState, first_token, prefill, speculate
from medusa.decoding.tree import Tree
from medusa.decoding.verify import Acceptance, packed
from medusa.model.kv_cache import KVCache

# a padding row's sampling: greedy, no cuts (typical threshold / alpha are unused when greedy)
_PAD = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "typical": False, "threshold": 0.09, "alpha": 0.3}
_FIELDS = tuple(_PAD)


@dataclass(frozen=True)
class GraphKey:
    """One fixed shape of work: a graph in the cache (or, eagerly, the shape it would have)."""

    kind: str  # "step" | "prefill"
    batch: int  # batch bucket (step) or row bucket (prefill)
    tree: tuple = ()  # the step's (name, paths, lookup)
    kv_len: int = 0  # cache slots the step attends over
    random: bool = False  # a sampled row in the step
    typical: bool = False  # a typical-acceptance row in the step
    prompt: int = 0  # the prefill's prompt bucket
    logprobs: bool = False  # the step also returns the emitted tokens' log-probabilities (logprobs.py)


@dataclass
class _Bucket:
    """Static per-bucket inputs of the step (their addresses are baked into the graphs)."""

    sampling: BatchSampling
    max_accept: torch.Tensor  # [Bb] long
    uniforms: dict[int, torch.Tensor] = field(default_factory=dict)  # N -> [Bb, N]
    loaded: object = None  # key of the sampling rows now in the buffers
    capped: object = None  # (running rows, depth) when max_accept holds the plain cap (no row off)
    views: dict[tuple[bool, bool], BatchSampling] = field(default_factory=dict)  # (any_random, any_typical) -> sampling


@dataclass(frozen=True)
class RowState:
    """The engine's per-row tensors over all pool rows (a step reads and updates rows 0 .. Bb-1)."""

    cache: KVCache  # kv [L, 2, rows, Hkv, row_len, Dh]
    start: torch.Tensor  # [rows] long
    root: torch.Tensor  # [rows] long
    hidden: torch.Tensor  # [rows, D]
    head_state: object
    rows: int
    draft: torch.Tensor | None = None  # [rows, MAX_LOOKUP] long: lookup chains' tokens (DecodeState.draft)


class Runner:
    # the methods that read or change device state: a tensor-parallel replica runs each on every rank
    REPLAYED = ("step", "prefill", "swap_rows", "copy_rows", "set_drafts", "prepare_step", "time_step", "prepare_prefill")

    def __init__(self, model, heads, rows: RowState, max_batch: int, max_prompt: int, prefill_tokens: int,
                 capture: bool = True, compile_mode: str | None = AUTO):
        """max_batch: most running rows; max_prompt: longest prompt; prefill_tokens: most token
        slots one prefill forward may take (0: one prompt a forward); capture: CUDA graphs;
        compile_mode: torch.compile the model's per-layer pieces for the step graphs (a
        torch.compile mode, "" for the default; graphs.CompiledBlocks), None: as written, AUTO:
        graphs.compile_choice."""
        compile_mode = compile_choice(compile_mode, capture, max_batch)
        if capture and model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        if compile_mode is not None and not capture:
            raise RuntimeError("compiled per-layer pieces run only inside CUDA-graph capture: compile needs graphs")
        self.model, self.heads, self.rows = model, heads, rows
        self.ops = CompiledBlocks(model, compile_mode or None) if compile_mode is not None else None
        # the heads' host-side preparation before steps (Hydra++ catching up on what plain steps
        # and prompts showed it): rows caught up, how often, and the host time it took
        self.catch_ups = {"rows": 0, "calls": 0, "seconds": 0.0}
        self.buckets = batch_buckets(min(max_batch, rows.rows))
        self.capture = capture
        self.graphs: dict[GraphKey, object] = {}  # the one graph cache
        self.trees: dict[tuple, Tree] = {}  # device copies the graphs read: they must outlive every replay
        # one memory pool per kind, as each kind was proven on its own: step graphs replay in any order
        self.pools = {k: torch.cuda.graph_pool_handle() for k in ("step", "prefill")} if capture else {}
        self._buckets: dict[int, _Bucket] = {}
        self.prefill_tokens = prefill_tokens
        self.prefill_logprobs = None  # of the last prefill that asked (prefill(logprobs=True))
        self.stage = PrefillStage(model, self.buckets[-1], max_prompt, prefill_tokens, heads=heads, fine=not capture)

    def captures(self, kind: str) -> int:
        return sum(1 for k in self.graphs if k.kind == kind)

    # -------------------------------------------------------------- shapes
    def bucket(self, n: int) -> int:
        return bucket_of(n, self.buckets)

    def kv_len(self, committed_max: int, nodes: int) -> int:
        """Slots a step attends over: a fixed bucket covering every running row (few graphs when
        capturing; the next multiple of 64 slots eagerly)."""
        need, cap = committed_max + nodes, self.rows.cache.max_len
        return kv_bucket(need, cap) if self.capture else kv_round(need, cap)

    def prefill_shape(self, k: int, T: int) -> tuple[int, int] | None:
        """The padded shape (R, Tb) of k fresh prompts of up to T tokens, None when they cannot
        share one forward (one prompt always can, up to the longest prompt)."""
        if k > 1 and not self.prefill_tokens:
            return None
        return self.stage.shape(k, T)

    def prefill_cost(self, k: int, T: int) -> float | None:
        """One prefill forward's cost (staging.plan_groups): k fresh prompts of up to T tokens."""
        return self.stage.cost(k, T) if self.prefill_shape(k, T) is not None else None

    # -------------------------------------------------------------- steps
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
        v = b.views.get((any_random, any_typical))
        if v is None:
            v = b.views[any_random, any_typical] = BatchSampling(*(getattr(b.sampling, k) for k in _FIELDS),
                                                                 any_random=any_random, any_typical=any_typical)
        return v

    def _view(self, Bb: int) -> DecodeState:
        """The decode state of rows 0 .. Bb-1: views of the engine's row tensors (in-place writes land there)."""
        R = self.rows
        return DecodeState(R.cache.rows(0, Bb), R.start[:Bb], R.root[:Bb], R.hidden[:Bb],
                           state_rows(R.head_state, 0, Bb), R.draft[:Bb] if R.draft is not None else None)

    def _after(self, Bb: int):
        """Runs after each step (inside a capture too): copies back whatever a head family rebinds
        instead of writing in place."""
        R = self.rows
        return lambda st: write_back(R.head_state, st.head_state, 0, Bb)

    def _prepare(self, lo: int, kv_lens: list[int], speculating: bool) -> None:
        """The heads' host-side hook before a step or prompt forward over rows lo .. lo+k-1
        (DraftHeads.prepare), outside any graph."""
        if self.heads is None or self.rows.head_state is None:
            return
        t0 = time.perf_counter()
        rows = self.heads.prepare(self.rows.head_state, lo, kv_lens, speculating)
        if rows:
            self.catch_ups["rows"] += rows
            self.catch_ups["calls"] += 1
            self.catch_ups["seconds"] += time.perf_counter() - t0  # host time: the GPU's runs on into the step

    def step(self, tree: Tree, n: int, committed: list[int], sampling: BatchSampling, sampling_key,
             uniforms: torch.Tensor | None, max_accept: list[int] | None, pad_start: list[int],
             logprobs: bool = False) -> tuple[Acceptance, bool]:
        """One step over rows 0 .. n-1 (padded to the bucket). committed: each running row's
        tokens in the cache; sampling / uniforms [n, N] / max_accept [n] (None: every row may
        accept up to the tree's depth) are the running rows'; pad_start the valid KV length of
        each padding row.
        logprobs: some row asked for log-probabilities (acc.logprobs, for every row of the step).
        They are computed inside the step (a graph of their own key) from the logits the step has
        anyway: keeping [B, N, V] logits alive past a replay for a separate function would cost
        that memory in every step graph, so steps without logprobs keep their graphs unchanged.
        Returns the acceptance of all Bb rows (read rows :n) and whether a graph was captured
        (a step that also captured is not a fair timing)."""
        Bb, N = self.bucket(n), tree.num_nodes
        R = self.rows
        self._prepare(0, committed, N > 1)
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
                cap[:n].copy_(torch.tensor(max_accept, dtype=torch.long), non_blocking=True)
                cap[n:].zero_()
                b.capped = None
            elif b.capped != (n, tree.accept_depth):  # the usual case, unchanged since the last step: no launches
                cap[:n].fill_(tree.accept_depth)
                cap[n:].zero_()
                b.capped = (n, tree.accept_depth)
        return self._run_step(tree, Bb, self.kv_len(max(committed), N), s, u, cap, logprobs)

    def _run_step(self, tree: Tree, Bb: int, kv_len: int, s: BatchSampling, u: torch.Tensor | None,
                  cap: torch.Tensor | None, logprobs: bool = False) -> tuple[Acceptance, bool]:
        """The step of (tree, Bb, kv_len, sampling kind) over rows 0 .. Bb-1: its graph (captured
        over views of the rows on first use; a replay needs no views), or the same work eagerly."""
        if not self.capture:
            state = self._view(Bb)
            acc = packed(speculate(self.model, self.heads, tree, state, s, u, cap, kv_len=kv_len, logprobs=logprobs))
            R = self.rows
            R.start[:Bb], R.root[:Bb], R.hidden[:Bb] = state.start, state.root, state.last_hidden
            self._after(Bb)(state)
            return acc, False
        tkey = (tree.name, tree.paths, tree.lookup)
        key = GraphKey("step", Bb, tkey, kv_len, s.any_random, s.any_typical, logprobs=logprobs)
        g = self.graphs.get(key)
        captured = g is None
        if captured:
            dtree = self.trees.get(tkey)
            if dtree is None:
                dtree = self.trees[tkey] = tree.to(self.rows.start.device)
            g = self.graphs[key] = capture_step(self.model, self.heads, dtree, kv_len, self._view(Bb), s, u, cap,
                                                self.pools["step"], self._after(Bb), self.ops, logprobs)
        g.graph.replay()
        return g.acc, captured

    def _idle(self, Bb: int, lengths: list[int]) -> None:
        self.rows.start[:Bb].copy_(torch.tensor(lengths, dtype=torch.long))

    def _greedy(self, tree: Tree, Bb: int, kv_len: int) -> tuple[Acceptance, bool]:
        b = self._bucket(Bb)
        return self._run_step(tree, Bb, kv_len, self._static(b), None, b.max_accept if tree.num_nodes > 1 else None)

    def prepare_step(self, tree: Tree, Bb: int, kv_len: int, lengths: list[int]) -> bool:
        """Capture the greedy step for (tree, Bb, kv_len) ahead of traffic, while no row runs,
        without running it. lengths: the valid KV length of each of rows 0 .. Bb-1 (their writes
        land past it). Returns whether a graph was captured (False: it existed, or no capture)."""
        if not self.capture:
            return False
        b = self._bucket(Bb)
        key = GraphKey("step", Bb, (tree.name, tree.paths, tree.lookup), kv_len, False, False)
        if key in self.graphs:
            return False
        self._idle(Bb, lengths)
        tkey = key.tree
        dtree = self.trees.setdefault(tkey, tree.to(self.rows.start.device))
        self.graphs[key] = capture_step(self.model, self.heads, dtree, kv_len, self._view(Bb), self._static(b), None,
                                        b.max_accept if tree.num_nodes > 1 else None, self.pools["step"],
                                        self._after(Bb), self.ops)
        return True

    def time_step(self, tree: Tree, Bb: int, kv_len: int, lengths: list[int], repeats: int = 3) -> float:
        """Median seconds of a greedy step over Bb idle rows (its graph's replay, or the same step
        eagerly), ending in the host sync a real step ends with. Rows must be idle: the step
        writes only past `lengths` and changes nothing else a request needs."""
        times = []
        for _ in range(repeats + 1):  # the first run warms up (and captures, with graphs)
            self._idle(Bb, lengths)
            t0 = time.perf_counter()
            acc, _ = self._greedy(tree, Bb, kv_len)
            acc.length.tolist()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    # -------------------------------------------------------------- prefills
    def _prefill_graph(self, R: int, Tb: int) -> tuple[object, bool]:
        key = GraphKey("prefill", R, prompt=Tb)
        g = self.graphs.get(key)
        if g is not None:
            return g, False
        g = self.graphs[key] = capture_fn(lambda: self.stage.forward(R, Tb), warmup=1, pool=self.pools["prefill"])
        return g, True

    def _forward(self, R: int, Tb: int) -> None:
        """The padded prompt forward of bucket (R, Tb): its graph's replay, or the same eagerly."""
        if self.capture:
            self._prefill_graph(R, Tb)[0]()
        else:
            self.stage.forward(R, Tb)

    def prepare_prefill(self, R: int, Tb: int, measure: bool = False, repeats: int = 3) -> bool:
        """Capture a prompt bucket's graph ahead of traffic; with measure, also time its replay
        (the median of `repeats`, for the prefill cost). Returns whether a graph was captured."""
        if not self.capture:
            return False
        with torch.inference_mode():
            replay, captured = self._prefill_graph(R, Tb)
            if measure:
                times = []
                for _ in range(repeats):  # replays write only the staging buffers
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    replay()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                self.stage.measured(R, Tb, statistics.median(times))
        return captured

    def prefill(self, r0: int, new: list[list[int]], reused: list[int], sampling: BatchSampling,
                uniforms: torch.Tensor | None, logprobs: bool = False) -> torch.Tensor:
        """Prefill pool rows r0 .. r0+k-1 with new[i], the tokens of row i after the reused[i]
        it already holds (right-padded into one [k, T] forward). Fresh rows (none reused) run at
        their padded shape (the staged forward also shows the heads with state the prompts); rows
        with a prefix run eagerly over it (step.prefill). Sets the rows' start, root, hidden and
        head state; returns each row's first token [k]. logprobs: also the first tokens'
        log-probabilities, left in `self.prefill_logprobs` (a logprobs.PathLogprobs over the k
        rows; None without)."""
        R = self.rows
        dev = R.start.device
        k, T = len(new), max(map(len, new))
        tokens = torch.tensor([t + [0] * (T - len(t)) for t in new], dtype=torch.long, device=dev)  # [k, T]
        lengths = torch.tensor([len(t) for t in new], dtype=torch.long, device=dev)  # [k]
        rows = slice(r0, r0 + k)
        cache = R.cache.rows(r0, r0 + k)  # writes land in the pool
        self._prepare(r0, reused, False)
        hs = state_rows(R.head_state, r0, r0 + k)
        if self.prefill_shape(k, T) is not None and not any(reused):
            hidden = self.stage.run(tokens, cache, lengths, hs, self._forward)
            root, last, lp = first_token(self.model, hidden, lengths, sampling, uniforms, logprobs)
            start = lengths
        else:
            start = torch.tensor(reused, dtype=torch.long, device=tokens.device)
            st = prefill(self.model, self.heads, cache, tokens, start, sampling, uniforms, hs, lengths, logprobs=logprobs)
            root, last, start, lp = st.root, st.last_hidden, st.start, st.logprobs
        self.prefill_logprobs = lp
        write_back(R.head_state, hs, r0, r0 + k)
        R.start[rows], R.root[rows], R.hidden[rows] = start, root, last
        return root

    # -------------------------------------------------------------- row state
    def swap_rows(self, swaps: list[Swap]) -> None:
        """Apply the pool's row swaps (kv_pool.RowPool) to every per-row tensor: the KV cache, the
        head state (kv_pool.PerRow), start / root / hidden."""
        R = self.rows
        for s in swaps:
            swap_cache_rows(R.cache, s)
            swap_state_rows(R.head_state, s.a, s.b)
            for t in (R.start, R.root, R.hidden):
                t[[s.a, s.b]] = t[[s.b, s.a]]

    def copy_rows(self, copies: list[tuple[int, int]], length: int, rows: list[int], roots: list[int]) -> None:
        """Beam search's reorder (engine/beams.py): each (dst, src) of copies makes row dst a copy
        of row src (the first `length` KV slots, the head state, the hidden state); no source may
        be a destination. Then rows[i] holds `length` committed slots and its next token roots[i]."""
        R = self.rows
        sources = {src for _, src in copies}
        for dst, src in copies:
            if dst in sources:
                raise RuntimeError(f"row {dst} is both copied to and from")
            copy_row(R.cache, dst, src, length)
            copy_row(R.head_state, dst, src, length)
            R.hidden[dst] = R.hidden[src]
        idx = torch.tensor(rows, dtype=torch.long, device=R.start.device)
        R.start[idx] = length
        R.root[idx] = torch.tensor(roots, dtype=torch.long, device=R.start.device)

    def set_drafts(self, drafts: list[list[int]]) -> None:
        """The lookup chains of rows 0 .. len(drafts)-1 for the next step (DecodeState.draft)."""
        L = len(drafts[0])
        self.rows.draft[:len(drafts), :L].copy_(torch.tensor(drafts, dtype=torch.long), non_blocking=True)
