"""CUDA-graph capture, applied from outside: the model, the heads and `step.speculate` do not
know about it. `capture` records any function over static buffers (a padded prefill);
`capture_step` records one verification step over a decode state's static buffers, so that a
replay launches the whole step (heads, base forward over every tree node, acceptance, KV
commit) with no host synchronisation. Which shapes are captured, and when, is the runner's
business (runner.py). `CompiledBlocks` holds compiled copies of the model's pure per-layer
pieces, which the runner hands to the captured code only (the model itself is not changed)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from medusa.decoding.kv_pool import scratch_state
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.step import DecodeState, speculate
from medusa.decoding.tree import Tree
from medusa.decoding.verify import Acceptance, packed
from medusa.model.llama import BlockOps

AUTO = "auto"


def compile_choice(mode: str | None, capture: bool, max_batch: int) -> str | None:
    """The torch.compile mode a runner's step graphs use (None: the pieces as written). `mode`
    is kept as given, except AUTO: the default mode where steps are CUDA graphs of one row and
    Triton is installed, else None. One row steps at a few shapes (one per tree), which compile
    once each; H100, 2026-12-06: the default model's graphed step 1.39 -> 1.14 ms, decoding 20
    MT-Bench prompts +23% (plain) / +16% (Hydra++); llama3-8b's step 1.20x -> 1.11x its
    bandwidth floor. A batched engine steps at every batch bucket x tree size, which compiles
    (a minute or more) at each and is unmeasured under load, so it stays as written unless
    asked. MEDUSA_COMPILE=0 turns AUTO off."""
    if mode != AUTO:
        return mode
    if not capture or max_batch != 1 or os.environ.get("MEDUSA_COMPILE", "1") == "0":
        return None
    return "" if importlib.util.find_spec("triton") is not None else None


class CompiledBlocks(BlockOps):
    """The model's pure per-layer pieces (RMSNorm, q/k/v projection with RoPE, SwiGLU MLP), each
    torch.compiled once, so that their elementwise work fuses into fewer kernels; the KV-cache
    writes and attention stay eager so that captured graphs keep writing the cache in place.
    The model is not changed: a forward runs these only when passed them (`model(..., ops=)`,
    here through `with_ops`), which the runner does inside step-graph warm-up and capture only
    (fixed shapes, compiled once per tree size; eager prefill's many prompt lengths would
    recompile per length). mode: a torch.compile mode; default $MEDUSA_COMPILE_MODE, else
    "default" (max-autotune-no-cudagraphs autotunes the GEMMs for minutes on a first run)."""

    def __init__(self, model, mode: str | None = None):
        mode = mode or os.environ.get("MEDUSA_COMPILE_MODE", "default")

        def compiled(fn):
            return torch.compile(fn, mode=mode, dynamic=False)

        self._fns: dict[int, object] = {}  # id(module) -> its compiled forward (project, for attention)
        for layer in model.layers:
            for mod in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
                self._fns[id(mod)] = compiled(mod.forward)
            self._fns[id(layer.self_attn)] = compiled(layer.self_attn.project)
        self._fns[id(model.norm)] = compiled(model.norm.forward)
        self._model = model  # keeps the modules (and so their ids) alive

    def norm(self, norm, x):
        return self._fns[id(norm)](x)

    def project(self, attn, x, cos, sin):
        return self._fns[id(attn)](x, cos, sin)

    def mlp(self, mlp, x):
        return self._fns[id(mlp)](x)


class _WithOps:
    """The model as the step sees it, its forward running with `ops`; every attribute is the model's."""

    def __init__(self, model, ops: BlockOps):
        self._model, self._ops = model, ops

    def __call__(self, *args, **kwargs):
        return self._model(*args, ops=self._ops, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def with_ops(model, ops: BlockOps | None):
    """`model`, or a wrapper whose calls run the forward with `ops` (None: the model itself)."""
    return model if ops is None else _WithOps(model, ops)


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
                 ops: BlockOps | None = None, logprobs: bool = False) -> _Captured:
    """Capture one `speculate` over the static buffers of `state` (whose start, root and
    last_hidden the replay updates in place; the head state and the cache are written in place
    by the step itself). `after(step_state)`, if given, runs inside the capture after the step
    (copies back whatever a head family rebinds). Warm-up runs twice on a side stream on scratch
    copies of the per-row state, so it changes nothing but cache slots past each row's start.
    ops: how the model runs its per-layer pieces in warm-up and capture (CompiledBlocks; None:
    as written). A capture executes nothing: replay the graph to run the step."""
    model = with_ops(model, ops)

    def body(st: DecodeState, static: bool) -> Acceptance:
        acc = packed(speculate(model, heads, tree, st, sampling, uniforms if sampling.any_random else None, max_accept,
                               kv_len=kv_len, logprobs=logprobs))
        if static:
            state.start.copy_(st.start)
            state.root.copy_(st.root)
            state.last_hidden.copy_(st.last_hidden)
            if after is not None:
                after(st)
        return acc

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
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
    return _Captured(g, acc)
