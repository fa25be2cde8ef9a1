"""CUDA-graph capture of the decode step, applied from outside: the model, the heads and
`step.speculate` do not know about it.

A GraphRunner owns one persistent KV cache and static state buffers for a batch of B rows,
and captures `speculate` once per (tree, KV-length bucket, sampling kind). A replay launches
the whole verification step (heads, base forward over every tree node, acceptance, KV commit)
with no host synchronisation; the caller reads the accepted length back once per step.
The prompt's forward replays the graph of its length bucket too (prefill_graphs.py, one row):
an eager prefill costs its kernel launches, about as long as six decode steps of the default
model on an H200 (median time to first token 16 ms). Where capture is impossible (no CUDA, or
heads that synchronise), the runner reports it and callers decode eagerly."""
from __future__ import annotations

from dataclasses import dataclass

import contextvars
import os

import torch

from medusa.decoding.kv_pool import scratch_state
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.step import DecodeState, speculate
from medusa.decoding.tree import MAX_LOOKUP, Tree
from medusa.decoding.verify import Acceptance

KV_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def kv_bucket(needed: int, max_len: int) -> int:
    """Smallest bucket holding `needed` slots (capped at the cache length)."""
    for b in KV_BUCKETS:
        if b >= needed:
            return min(b, max_len)
    return max_len


_capturing = contextvars.ContextVar("medusa_graph_capture", default=False)


def _routed(eager, compiled):
    """Compiled code inside graph warm-up and capture (fixed shapes, compiled once per tree size),
    eager code elsewhere: prefill's many prompt lengths would otherwise recompile per length."""
    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if _capturing.get() else eager(*args, **kwargs)

    return forward


def compile_blocks(model, mode: str | None = None):
    """torch.compile the pure per-layer pieces (RMSNorm, q/k/v projection with RoPE, SwiGLU MLP)
    so their elementwise work fuses into fewer kernels; the KV-cache writes and attention stay
    eager so that captured graphs keep writing the cache in place. The compiled pieces run only
    while a GraphRunner warms up and captures a step. Returns the model.
    mode: a torch.compile mode; default $MEDUSA_COMPILE_MODE, else "default" (max-autotune-no-cudagraphs
    autotunes the GEMMs for minutes on a first run)."""
    mode = mode or os.environ.get("MEDUSA_COMPILE_MODE", "default")

    def wrap(fn):
        return _routed(fn, torch.compile(fn, mode=mode, dynamic=False))

    for layer in model.layers:
        for mod in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            mod.forward = wrap(mod.forward)
        layer.self_attn.project = wrap(layer.self_attn.project)
    model.norm.forward = wrap(model.norm.forward)
    return model


def capture(fn, warmup: int = 2, pool=None):
    """Capture `fn()` as a CUDA graph and return its replay function. fn must read and write
    only tensors that outlive the graph (static buffers); it is run `warmup` times eagerly on a
    side stream first (lazy initialisation stays out of the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return g.replay


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    acc: Acceptance  # tensors the replay writes


def capture_step(model, heads, tree: Tree, kv_len: int, state: DecodeState, sampling: BatchSampling,
                 uniforms: torch.Tensor | None, max_accept: torch.Tensor | None, pool, after=None,
                 defer: torch.Tensor | None = None) -> _Captured:
    """Capture one `speculate` over the static buffers of `state` (whose start, root and
    last_hidden the replay updates in place; the head state and the cache are written in place
    by the step itself). `after(step_state)`, if given, runs inside the capture after the step
    (copies back whatever a head family rebinds). Warm-up runs twice on a side stream on scratch
    copies of the per-row state, so it changes nothing but cache slots past each row's start.
    A capture executes nothing: replay the graph to run the step."""
    B = state.root.shape[0]

    def body(st: DecodeState, static: bool) -> Acceptance:
        acc = speculate(model, heads, tree, st, sampling, uniforms if sampling.any_random else None, max_accept,
                        kv_len=kv_len, defer=defer)
        if static:
            state.start.copy_(st.start)
            state.root.copy_(st.root)
            state.last_hidden.copy_(st.last_hidden)
            if after is not None:
                after(st)
        return acc

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    token = _capturing.set(True)
    try:
        with torch.cuda.stream(side):
            for _ in range(2):
                scratch = DecodeState(state.cache, state.start.clone(), state.root.clone(), state.last_hidden.clone(),
                                      scratch_state(state.head_state, B), state.draft)
                body(scratch, static=False)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            acc = body(DecodeState(state.cache, state.start, state.root, state.last_hidden, state.head_state, state.draft),
                       static=True)
    finally:
        _capturing.reset(token)
    return _Captured(g, acc)


class GraphRunner:
    def __init__(self, model, heads, batch: int = 1, max_len: int = 2048):
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        dev = model.device
        self.model, self.heads, self.batch = model, heads, batch
        self.cache = model.new_cache(batch, max_len)
        z = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.start, self.root = z(batch), z(batch)  # [B]
        self.last_hidden = z(batch, model.cfg.hidden_size, dtype=model.dtype)  # [B, D]
        self.draft = z(batch, MAX_LOOKUP)  # [B, MAX_LOOKUP]: lookup chains' tokens (set_draft before a step)
        self.head_state = heads.new_state(batch, max_len, model) if heads is not None else None
        self.sampling = BatchSampling(z(batch, dtype=torch.float32), z(batch, dtype=torch.float32) + 1, z(batch),
                                      z(batch, dtype=torch.bool), z(batch, dtype=torch.float32), z(batch, dtype=torch.float32))
        self.uniforms: dict[int, torch.Tensor] = {}  # per tree size: [B, N]
        self.graphs: dict[tuple, _Captured] = {}
        self.trees: dict[tuple, Tree] = {}  # device copies the graphs read: they must outlive every replay
        self.pool = torch.cuda.graph_pool_handle()
        self._prefills = None  # PrefillGraphs of one row, built on first use

    @property
    def prefills(self):
        """The prompt forward's graphs (one row, length buckets up to max_len), built on first use."""
        if self._prefills is None:
            from medusa.decoding.prefill_graphs import PrefillGraphs  # it builds on this module

            self._prefills = PrefillGraphs(self.model, 1, self.max_len, self.max_len, heads=self.heads)
        return self._prefills

    def prepare_prefill(self, longest_prompt: int) -> int:
        """Capture the prompt forward of every length bucket up to longest_prompt tokens ahead of
        the first request (a capture is several prefills' worth). Returns the graphs captured."""
        pg = self.prefills
        top = pg.shape(1, min(longest_prompt, self.max_len))
        return sum(pg.prepare(1, Tb) for _, Tb in pg.shapes() if top is not None and Tb <= top[1])

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def state(self) -> DecodeState:
        return DecodeState(self.cache, self.start, self.root, self.last_hidden, self.head_state, self.draft)

    def set_draft(self, tokens: list[list[int]]) -> None:
        """The lookup chain's tokens of each row for the next step (rows [B][L], L <= MAX_LOOKUP)."""
        self.draft[:, :len(tokens[0])].copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)

    def load(self, state: DecodeState, sampling: BatchSampling) -> None:
        """Copy a (prefilled) state and the rows' sampling parameters into the static buffers."""
        assert state.cache is self.cache, "prefill into runner.cache"
        self.start.copy_(state.start)
        self.root.copy_(state.root)
        self.last_hidden.copy_(state.last_hidden)
        for name in ("temperature", "top_p", "top_k", "typical", "threshold", "alpha"):
            getattr(self.sampling, name).copy_(getattr(sampling, name))
        self.sampling = BatchSampling(*(getattr(self.sampling, n) for n in
                                        ("temperature", "top_p", "top_k", "typical", "threshold", "alpha")),
                                      any_random=sampling.any_random, any_typical=sampling.any_typical)

    def _capture(self, tree: Tree, kv_len: int) -> _Captured:
        N = tree.num_nodes
        self.uniforms.setdefault(N, torch.zeros(self.batch, N, device=self.start.device))
        return capture_step(self.model, self.heads, tree, kv_len, self.state(), self.sampling, self.uniforms[N],
                            None, self.pool)

    def step(self, tree: Tree, committed_max: int, uniforms: torch.Tensor | None = None) -> Acceptance:
        """Replay the step for `tree`. committed_max: the largest row `start` (known on the host
        from the lengths already read back), which picks the KV bucket."""
        kv_len = kv_bucket(committed_max + tree.num_nodes, self.max_len)
        tkey = (tree.name, tree.paths, tree.lookup)
        if tkey not in self.trees:
            self.trees[tkey] = tree.to(self.start.device)
        key = (tkey, kv_len, self.sampling.any_random, self.sampling.any_typical)
        cap = self.graphs.get(key)
        if cap is None:
            cap = self.graphs[key] = self._capture(self.trees[tkey], kv_len)
        if uniforms is not None:
            self.uniforms[tree.num_nodes].copy_(uniforms)
        cap.graph.replay()
        return cap.acc
