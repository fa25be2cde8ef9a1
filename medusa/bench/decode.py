"""Decode throughput on a prompt set: each mode (`hf`, `ar`, `medusa`, `hydra`, or
`medusa:TREE` to pin a tree) runs every prompt, interleaved prompt by prompt, after a warm-up
that is not counted. Our modes decode through the one Engine at batch 1 (medusa.decoding.generate,
one engine per mode, built and warmed up once: on a GPU its step and prompt graphs are captured
before the first timed request); `hf` is HF transformers `generate`, greedy, on the same weights, dtype and device.

Does not know about files, plots or progress bars: it returns plain records, and reports
progress through a callback."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from medusa.decoding.generate import Stats, single_engine, stream
from medusa.decoding.graphs import AUTO
from medusa.decoding.tree import Tree, load_tree, own_tree, resolve_tree
from medusa.errors import ModelLoadError, RequestError
from medusa.heads.io import untrained_heads
from medusa.runtime import DEFAULT_TREE, resolve_heads, shipped_heads_dir
from medusa.bench.env import synchronize

KINDS = {"hf": "hf", "ar": "ar", "medusa": "spec", "hydra": "spec"}


@dataclass(frozen=True)
class ModeSpec:
    label: str  # as written in --modes, e.g. "medusa" or "medusa:tree32"
    kind: str  # "hf" | "ar" | "spec"
    heads: str | None = None  # "medusa" | "hydra" for spec modes
    tree: str | None = None  # pinned tree name or file (spec modes)


def parse_modes(text: str) -> list[ModeSpec]:
    """`hf,ar,medusa,hydra,medusa:tree32` -> specs (order kept, duplicates refused)."""
    specs, seen = [], set()
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, tree = item.partition(":")
        if name not in KINDS:
            raise RequestError(f"unknown mode {name!r} in --modes: use {', '.join(KINDS)} (spec modes may pin a tree: medusa:tree32)")
        if tree and KINDS[name] != "spec":
            raise RequestError(f"mode {name!r} takes no tree (only medusa:TREE / hydra:TREE)")
        if item in seen:
            raise RequestError(f"mode {item!r} is listed twice in --modes")
        seen.add(item)
        specs.append(ModeSpec(item, KINDS[name], name if KINDS[name] == "spec" else None, tree or None))
    if not specs:
        raise RequestError("--modes lists no mode")
    return specs


@dataclass
class Run:
    """One mode on one prompt."""

    tokens: list[int]
    seconds: float  # wall time from the call to the last token
    ttft_s: float  # wall time to the first new token
    steps: int  # forward passes after the prefill (hf: new tokens - 1)
    step_tokens: list[int] = field(default_factory=list)  # tokens produced by each step
    finish_reason: str | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(self.step_tokens) / len(self.step_tokens) if self.step_tokens else 0.0


@dataclass
class Mode:
    spec: ModeSpec
    run: Callable[[list[int], int], Run]  # (prompt ids, max_new_tokens) -> Run
    heads_label: str | None = None  # "medusa", "hydra", "untrained", ...
    tree: Tree | None = None
    note: str | None = None  # e.g. why untrained heads stand in for shipped ones
    compiled: bool = False  # its step graphs run torch.compiled per-layer pieces

    @property
    def label(self) -> str:
        return self.spec.label


# ------------------------------------------------------------------ our modes

def _ours(engine, eos: tuple[int, ...], beams: int = 1):
    if beams > 1:
        return _ours_beams(engine, eos, beams)

    def run(ids: list[int], max_new_tokens: int) -> Run:
        stats = Stats()
        out: list[int] = []
        for chunk in stream(engine, ids, max_new_tokens=max_new_tokens, stop_token_ids=eos, stats=stats):
            out.extend(chunk.tokens)
        return Run(out, stats.seconds, stats.ttft, stats.steps, list(stats.step_tokens), stats.finish_reason)

    return run


def _ours_beams(engine, eos: tuple[int, ...], beams: int):
    """Beam search with K beams (length penalty 1, early_stopping False: HF's defaults): the
    best beam's tokens; a step is a verification step, its tokens the beam steps it ran."""
    from medusa.decoding.engine import Request

    def run(ids: list[int], max_new_tokens: int) -> Run:
        t0 = time.perf_counter()
        evs = list(engine.submit(Request(ids, max_new_tokens=max_new_tokens, stop_token_ids=eos, beams=beams)))
        seconds = time.perf_counter() - t0
        last = evs[-1]
        st = last.stats
        return Run(list(last.beams[0].tokens) if last.beams else [], seconds, seconds, st.steps, list(st.beam_steps),
                   last.finish_reason)

    return run


def _spec_tree(spec: ModeSpec, cli_tree: str | None, heads, heads_label: str) -> Tree:
    # "hydra:+lookup8": the heads' own tree with a lookup chain
    tree = resolve_tree(spec.tree or cli_tree,
                        lambda: own_tree(heads.config, heads_label) if heads.config.tree else load_tree(DEFAULT_TREE))
    if tree.max_depth > heads.config.num_heads:
        raise RequestError(f"tree {tree.name} is {tree.max_depth} deep but the {heads_label} heads guess only "
                           f"{heads.config.num_heads} tokens ahead")
    return tree


def _heads_for(name: str, model, source, cache: dict):
    """(heads, label, note) or (None, None, reason to skip). Unshipped Medusa heads fall back
    to untrained ones (correct, rarely accepted); unshipped Hydra heads skip the mode."""
    if name in cache:
        return cache[name]
    if shipped_heads_dir(name) is not None:
        heads, label = resolve_heads(name, model, source)
        got = (heads, label, None)
    elif name == "medusa":
        got = (untrained_heads(model), "untrained", "no shipped Medusa heads in this installation: untrained Medusa heads stand in "
                             "(outputs stay exact, but few guesses are accepted, so speedups are not meaningful)")
    else:
        got = (None, None, f"no shipped {name} heads in this installation: mode skipped")
    cache[name] = got
    return got


# ------------------------------------------------------------------ HF transformers baseline

def load_hf_model(source, dtype: torch.dtype, device: torch.device):
    """HF transformers' own model class on the very weights our model loaded (the converted
    checkpoint directory), in the same dtype and on the same device."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(source.hf_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"HF transformers cannot load {source.hf_dir.name}: {e}") from None
    hf = hf.to(device=device, dtype=dtype).eval()
    return hf


def _hf(hf_model, eos: tuple[int, ...], device: torch.device, beams: int = 1):
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """Records when generate hands over its first new token (the first put is the prompt)."""

        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    def run(ids: list[int], max_new_tokens: int) -> Run:
        gc = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                              pad_token_id=eos[0], num_beams=beams)
        x = torch.tensor([ids], device=device)
        streamer = FirstToken()
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc,
                                    streamer=streamer if beams == 1 else None)  # HF beam search cannot stream
        synchronize(device)
        seconds = time.perf_counter() - t0
        new = out[0, len(ids):].tolist()
        if beams > 1 and any(t in eos for t in new):  # a beam that ended early is padded with eos[0]
            new = new[:next(i for i, t in enumerate(new) if t in eos) + 1]
        finish = "eos" if new and new[-1] in eos else "length"
        ttft = (streamer.first or time.perf_counter()) - t0
        return Run(new, seconds, ttft, max(len(new) - 1, 0), [1] * max(len(new) - 1, 0), finish)

    return run


# ------------------------------------------------------------------ assembling and running

def engine_for(model, heads, tree: Tree, longest: int, graphs: bool = False, compile_mode: str | None = AUTO,
               beams: int = 1):
    """An Engine(max_batch=1) decoding with exactly `tree` (heads None: plain decoding), for
    sequences up to `longest` tokens; with graphs (a CUDA device), its greedy step and prompt
    graphs are captured now, so that no timed request pays a capture. compile_mode: Engine's.
    beams: rows for beam search (its steps' graphs, with log-probabilities, capture in the warm-up runs)."""
    engine = single_engine(model, heads, tree, max_seq_len=min(longest, model.cfg.max_position_embeddings), graphs=graphs,
                           compile_mode=compile_mode, max_batch=beams)
    if graphs:
        engine.warmup(trees=[engine.default_tree.name], measure=False)
    return engine


def prepare_modes(specs: list[ModeSpec], model, source, eos: tuple[int, ...], cli_tree: str | None = None,
                  hf_loader: Callable[[], object] | None = None, longest: int = 2048,
                  graphs: bool = False, compile_mode: str | None = AUTO,
                  beams: int = 1) -> tuple[list[Mode], dict[str, str]]:
    """Build an engine per mode for sequences up to `longest` tokens. graphs: replay our decode
    steps and prompt forwards as CUDA graphs (on a CUDA device); else they run eagerly.
    compile_mode: torch.compile the per-layer pieces inside the step graphs (Engine's).
    beams > 1: every mode runs beam search with that many beams (ar: plain beam search, spec
    modes: speculative beam search, hf: generate(num_beams=K)).
    Returns (modes, skipped: label -> reason)."""
    modes, skipped, heads_cache = [], {}, {}
    for spec in specs:
        if spec.kind == "ar":
            tree = load_tree("ar")
            engine = engine_for(model, None, tree, longest, graphs, compile_mode, beams)
            modes.append(Mode(spec, _ours(engine, eos, beams), None, tree, compiled=engine.runner.ops is not None))
        elif spec.kind == "hf":
            hf_model = hf_loader() if hf_loader else load_hf_model(source, model.dtype, model.device)
            modes.append(Mode(spec, _hf(hf_model, eos, model.device, beams), None, None,
                              "HF transformers generate, greedy, default dynamic KV cache"
                              + (f", num_beams={beams}" if beams > 1 else "")))
        else:
            heads, label, note = _heads_for(spec.heads, model, source, heads_cache)
            if heads is None:
                skipped[spec.label] = note
                continue
            tree = _spec_tree(spec, cli_tree, heads, label)
            engine = engine_for(model, heads, tree, longest, graphs, compile_mode, beams)
            modes.append(Mode(spec, _ours(engine, eos, beams), label, tree, note, compiled=engine.runner.ops is not None))
    return modes, skipped


def run_modes(modes: list[Mode], prompts: list[list[int]], max_new_tokens: int, warmup: int = 1,
              on_run: Callable[[str, int], None] | None = None) -> list[dict[str, Run]]:
    """Warm every mode up on the first `warmup` prompts (not recorded), then for each prompt
    run every mode in turn. Returns one {mode label: Run} per prompt."""
    for ids in prompts[:warmup]:
        for m in modes:
            m.run(ids, max_new_tokens)
            if on_run:
                on_run(f"warm-up {m.label}", -1)
    results = []
    for i, ids in enumerate(prompts):
        row = {}
        for m in modes:
            row[m.label] = m.run(ids, max_new_tokens)
            if on_run:
                on_run(m.label, i)
        results.append(row)
    return results
