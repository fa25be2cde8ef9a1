"""What one verification forward costs: the median time of a forward over N query tokens
(a tree-shaped mask, as the decode step builds it) on top of a cache holding `context`
tokens, for a randomly initialised model of a named public shape, set against the
bandwidth floor (weight bytes / the device's measured copy rate).

The rows double as the step-cost table the engine's adaptive speculation reads:
{"device", "shape", "rows": [{"context", "queries", "batch", "seconds_median", "graphs"}]}.
Knows nothing of prompts, heads or acceptance: the tokens are random and the tree is the
shape search_tree gives for the node budget under the prior head accuracies."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from medusa.decoding.buckets import kv_round
from medusa.decoding.step import attention_mask
from medusa.decoding.tree import Tree, build_tree, prior_accuracies, search_tree
from medusa.errors import RequestError
from medusa.model.config import ModelConfig
from medusa.model.llama import EAGER, BlockOps, Transformer
from medusa.bench.env import synchronize

_LLAMA = dict(arch="llama", num_layers=32, num_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)
SHAPES: dict[str, ModelConfig] = {
    "llama-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_kv_heads=32, **_LLAMA),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_kv_heads=8,
                             rope_theta=500000.0, **_LLAMA),
    "tiny": ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_position_embeddings=4096),
}
DEFAULT_SHAPE = "smollm2-135m"  # read from the default model's config.json


def shape_config(name: str) -> ModelConfig:
    """A named shape, `smollm2-135m` (the default model's own config), or an HF config.json
    path / checkpoint directory."""
    from pathlib import Path

    if name in SHAPES:
        return SHAPES[name]
    if name == DEFAULT_SHAPE:
        from medusa.model.loading import read_config, resolve

        return read_config(resolve(None).hf_dir)
    p = Path(name)
    if p.is_dir() or p.name == "config.json":
        from medusa.model.loading import read_config

        return read_config(p if p.is_dir() else p.parent)
    raise RequestError(f"unknown shape {name!r}: use {', '.join([*SHAPES, DEFAULT_SHAPE])} or a config.json path")


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_params * torch.empty((), dtype=dtype).element_size()


def kv_bytes(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * max_len * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory(device: torch.device) -> int:
    """Bytes available for new tensors on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown: do not refuse


def pick_dtype(cfg: ModelConfig, requested: torch.dtype | None, device: torch.device, max_len: int) -> tuple[torch.dtype, str | None]:
    """The dtype to build the model in, and a note when it differs from the default. Refuses
    (RequestError) when the weights and cache would not fit in memory."""
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    candidates = [requested] if requested is not None else [default, torch.bfloat16]
    avail = free_memory(device)
    for dt in dict.fromkeys(candidates):
        need = weight_bytes(cfg, dt) + kv_bytes(cfg, max_len, dt)
        if need < 0.85 * avail:
            note = None if dt == default or requested is not None else \
                f"{default} weights ({weight_bytes(cfg, default) / 1e9:.1f} GB) do not fit in memory: built in {dt}"
            return dt, note
    dt = candidates[-1]
    raise RequestError(
        f"a {cfg.num_params / 1e9:.1f}B-parameter model in {str(dt).removeprefix('torch.')} needs "
        f"{(weight_bytes(cfg, dt) + kv_bytes(cfg, max_len, dt)) / 1e9:.1f} GB for weights and cache, "
        f"but only {avail / 1e9:.1f} GB is free on {device.type}"
        + ("" if dt == torch.bfloat16 else ": try --dtype bfloat16"))


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """Weights drawn N(0, 0.02) directly in `dtype` on `device` (no float32 copy on the way)."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    from medusa.model.rope import rope_table

    cos, sin = rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval().requires_grad_(False).fuse_projections_where_faster()  # as load_model places it


def copy_rate(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured device memory bandwidth: bytes read + written per second by a large
    device-to-device copy (median of `repeats`)."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def query_tree(n: int) -> Tree:
    """The n-node tree the decode step would verify (1 = plain AR; search_tree under the prior
    accuracies otherwise, deep enough to place n nodes)."""
    if n == 1:
        return build_tree([], name="ar")
    acc = prior_accuracies(num_heads=8, topk=max(10, n))
    return build_tree(search_tree(acc, n), name=f"tree{n}")


def _forward_fn(model: Transformer, context: int, n: int, graphs: bool, ops: BlockOps = EAGER) -> Callable[[], None] | None:
    """A callable running one verification forward of n nodes at `context`, or None when
    graphs were asked for but medusa.decoding.graphs offers no capture. ops: the forward's
    per-layer pieces (llama.BlockOps; EAGER: as written)."""
    cfg, dev = model.cfg, model.device
    tree = query_tree(n)
    kv_len = kv_round(context + n, context + n + 64)  # the next multiple of 64 slots
    cache = model.new_cache(1, kv_len)
    cache.kv.normal_(0, 1)
    start = torch.tensor([context], device=dev)
    tokens = torch.randint(0, cfg.vocab_size, (1, n), device=dev)  # [1, N]
    positions = start[:, None] + tree.depth.to(dev)  # [1, N]
    slots = start[:, None] + torch.arange(n, device=dev)  # [1, N]
    mask = attention_mask(start, tree.mask.to(dev), kv_len)  # [1, N, S]

    def eager() -> None:
        model(tokens, positions, cache, slots, mask, logits_for="all", ops=ops)

    if not graphs:
        return eager
    capture = graph_capture()
    return capture(eager) if capture is not None else None


def graph_capture() -> Callable[[Callable[[], None]], Callable[[], None]] | None:
    """`medusa.decoding.graphs.capture(fn) -> replay` when that module exists (it holds the
    CUDA-graph capture of the decode step); None otherwise."""
    try:
        from medusa.decoding import graphs
    except ImportError:
        return None
    return getattr(graphs, "capture", None)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int = 2, min_repeats: int = 5,
            max_repeats: int = 50, budget_s: float = 2.0) -> list[float]:
    """Wall times of `fn` (after `warmup` calls), repeated until `budget_s` or max_repeats."""
    with torch.inference_mode():
        t0 = time.perf_counter()  # warm up for `warmup` calls and at least a quarter of the budget
        for i in range(max_repeats):
            fn()
            synchronize(device)
            if i + 1 >= warmup and time.perf_counter() - t0 >= budget_s / 4:
                break
        times: list[float] = []
        spent = 0.0
        while len(times) < min_repeats or (len(times) < max_repeats and spent < budget_s):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
            spent += times[-1]
    return times


def measure(model: Transformer, contexts: list[int], queries: list[int], graphs: bool, budget_s: float = 2.0,
            on_row: Callable[[dict], None] | None = None) -> tuple[list[dict], str | None]:
    """One row per (context, queries, graphs). Returns (rows, why graph rows are missing or None)."""
    rows, graphs_missing = [], None
    dev = model.device
    for g in ([False, True] if graphs else [False]):
        if g and dev.type != "cuda":
            graphs_missing = "CUDA graphs need a CUDA device"
            break
        if g and graph_capture() is None:
            graphs_missing = "medusa.decoding.graphs (CUDA-graph capture) is not available"
            break
        for c in contexts:
            for n in queries:
                if c + n > model.cfg.max_position_embeddings:
                    raise RequestError(f"context {c} + {n} queries exceeds the shape's {model.cfg.max_position_embeddings} positions")
                with torch.inference_mode():
                    fn = _forward_fn(model, c, n, g)
                times = time_fn(fn, dev, budget_s=budget_s)
                row = {"context": c, "queries": n, "batch": 1, "graphs": g,
                       "seconds_median": round(statistics.median(times), 6),
                       "seconds_min": round(min(times), 6), "repeats": len(times)}
                rows.append(row)
                if on_row:
                    on_row(row)
                del fn
    return rows, graphs_missing


def add_ratios(rows: list[dict], floor_s: float) -> None:
    """x_floor = time / bandwidth floor; x_one_token = time / the 1-query time at that context."""
    one = {(r["context"], r["graphs"]): r["seconds_median"] for r in rows if r["queries"] == 1}
    for r in rows:
        r["x_floor"] = round(r["seconds_median"] / floor_s, 3) if floor_s > 0 else None
        base = one.get((r["context"], r["graphs"]))
        r["x_one_token"] = round(r["seconds_median"] / base, 3) if base else None


def step_cost_markdown(doc: dict) -> str:
    from medusa.bench.report import header_lines

    lines = [f"### Step cost: {doc['shape']} on {doc['device']}", ""]
    lines += header_lines(doc)
    lines += ["", f"{doc['params'] / 1e6:.0f}M parameters, {doc['dtype']}, weights {doc['weight_bytes'] / 1e9:.3f} GB; "
              f"measured copy rate {doc['copy_rate_gbs']:.1f} GB/s (read + write) -> bandwidth floor "
              f"{doc['floor_s'] * 1e3:.2f} ms per forward. Graphs: "
              f"{'measured' if doc['graphs'] else 'not measured (' + (doc.get('graphs_note') or 'off') + ')'}.", ""]
    queries = sorted({r["queries"] for r in doc["rows"]})
    lines.append("| context | graphs | " + " | ".join(f"{q} tok (ms)" for q in queries) + " | 1 tok / floor |")
    lines.append("|---:|---|" + "---:|" * len(queries) + "---:|")
    for (c, g) in sorted({(r["context"], r["graphs"]) for r in doc["rows"]}):
        by_q = {r["queries"]: r for r in doc["rows"] if r["context"] == c and r["graphs"] == g}
        cells = []
        for q in queries:
            r = by_q.get(q)
            cells.append("-" if r is None else f"{r['seconds_median'] * 1e3:.2f} ({r['x_one_token']:.2f}x)")
        first = by_q.get(1)
        tail = f" | {first['x_floor']:.2f}x |" if first else " | - |"
        lines.append(f"| {c} | {'on' if g else 'off'} | " + " | ".join(cells) + tail)
    lines += ["", "Cells: median ms per forward (ratio to the 1-token forward at that context)."]
    return "\n".join(lines) + "\n"
