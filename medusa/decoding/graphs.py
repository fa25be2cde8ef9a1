"""CUDA-graph capture, applied from outside: the model, the heads and `step.speculate` do not
know about it. `capture` records any function over static buffers (a padded prefill);
`capture_step` records one verification step over a decode state's static buffers, so that a
replay launches the whole step (heads, base forward over every tree node, acceptance, KV
commit) with no host synchronisation. Which shapes are captured, and when, is the runner's
business (runner.py). `compile_blocks` compiles the model's pure per-layer pieces for the
captured code only."""
from __future__ import annotations

from dataclasses import dataclass

import contextvars
import os

import torch

from medusa.decoding.kv_pool import scratch_state
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.step import DecodeState, speculate
from medusa.decoding.tree import Tree
from medusa.decoding.verify import Acceptance

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
    while a step graph is warmed up and captured (capture_step). Returns the model.
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
                 defer: torch.Tensor | None = None, logprobs: bool = False) -> _Captured:
    """Capture one `speculate` over the static buffers of `state` (whose start, root and
    last_hidden the replay updates in place; the head state and the cache are written in place
    by the step itself). `after(step_state)`, if given, runs inside the capture after the step
    (copies back whatever a head family rebinds). Warm-up runs twice on a side stream on scratch
    copies of the per-row state, so it changes nothing but cache slots past each row's start.
    A capture executes nothing: replay the graph to run the step."""

    def body(st: DecodeState, static: bool) -> Acceptance:
        acc = speculate(model, heads, tree, st, sampling, uniforms if sampling.any_random else None, max_accept,
                        kv_len=kv_len, defer=defer, logprobs=logprobs)
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
                                      scratch_state(state.head_state), state.draft)
                body(scratch, static=False)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            acc = body(DecodeState(state.cache, state.start, state.root, state.last_hidden, state.head_state, state.draft),
                       static=True)
    finally:
        _capturing.reset(token)
    return _Captured(g, acc)
