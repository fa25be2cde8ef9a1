"""Where the time of one verification forward of a large public shape goes, on a GPU (issue 29):
random bfloat16 weights (medusa.bench.step_cost.random_model), batch 1, for each query count
(1 = the plain step, 64 = a 64-node tree) and context:

  graph     mean GPU time of one CUDA-graph replay (CUDA events over 100 back-to-back replays),
            the number of kernels in it and the sum of their durations (torch.profiler)
  floor     the weight bytes over the measured copy rate (what `medusa bench --step-cost` calls
            the bandwidth floor), and graph / floor
  roles     the same forward run eagerly under torch.profiler, GPU time per role: each GEMM by
            the weight it reads (qkv, o, gate_up, down, lm_head; with its bytes and the rate it
            reached against the copy rate), attention, norms, RoPE, the KV write, the rest by
            aten operator; summed over the layers
  kernels   the replay's kernels by name, summed (top 12)

    python scripts/gpu/profile_shape.py --shape llama3-8b --queries 1,64 --contexts 512,2048 --out prof.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medusa.bench.step_cost import _forward_fn, copy_rate, random_model, shape_config, weight_bytes  # noqa: E402
from medusa.decoding.graphs import CompiledBlocks  # noqa: E402
from medusa.model.llama import EAGER  # noqa: E402


def gemm_roles(cfg) -> dict[frozenset, tuple[str, int]]:
    """{frozenset of the two weight dims: (role, weight bytes per call)} in bfloat16."""
    d, dh, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * dh
    # a GPU fuses q/k/v and gate/up (llama.fuse_projections): o and q, down and gate share dims
    dims = {"qkv": (d, qkv), "o": (cfg.num_heads * dh, d), "gate_up": (d, 2 * f), "down": (f, d),
            "lm_head": (d, cfg.vocab_size)}
    return {frozenset(v): (k, 2 * v[0] * v[1]) for k, v in dims.items()}


def role_of(e, roles) -> tuple[str, int]:
    """(role, weight bytes) of one aten event; bytes 0 where it reads no weight."""
    name = e.name
    if name in ("aten::mm", "aten::addmm", "aten::_scaled_mm", "aten::bmm"):
        shapes = [s for s in (e.input_shapes or []) if len(s) == 2]
        dims = {d for s in shapes for d in s}
        for key, (role, nbytes) in roles.items():
            if key <= dims and (len(key) == 2 or len(dims - key) <= 1):
                return role, nbytes
        return f"{name} {shapes}", 0
    stack = " ".join(e.stack or [])
    for word, role in (("attention", "attention"), ("rms_norm", "norm"), ("rmsnorm", "norm"), ("apply_rope", "rope"),
                       ("write_kv", "kv write"), ("kv_cache", "kv write"), ("silu", "silu*mul")):
        if word in stack or word in name:
            return role, 0
    return name, 0


def eager_roles(fn, roles, rate: float) -> list[dict]:
    cuda = torch.cuda.is_available()
    fn()
    cfg = torch._C._profiler._ExperimentalConfig(verbose=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True, with_stack=True, experimental_config=cfg) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    agg: dict[str, list] = {}
    for e in prof.events():
        us = getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total", 0.0)
        if us <= 0:
            continue
        if e.name.startswith("aten::"):
            role, nbytes = role_of(e, roles)
        elif "attention" in e.name and e.device_type.name != "CUDA":  # a Triton kernel's launch (no aten op)
            role, nbytes = "attention", 0
        else:
            continue
        a = agg.setdefault(role, [0, 0.0, 0])
        a[0] += 1
        a[1] += us / 1000.0
        a[2] += nbytes
    out = []
    for role, (calls, ms, nbytes) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        row = {"role": role, "calls": calls, "ms": round(ms, 4)}
        if nbytes:
            row["weight_mb"] = round(nbytes / 1e6, 1)
            row["x_copy_rate"] = round(ms / 1e3 / (nbytes / rate), 2)  # time / (bytes at the copy rate)
        out.append(row)
    return out


def graph_profile(replay) -> tuple[float, int, float, dict]:
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(100):
        replay()
    e1.record()
    torch.cuda.synchronize()
    ms = e0.elapsed_time(e1) / 100
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, float] = {}
    for e in kern:
        by_name[e.name[:70]] = by_name.get(e.name[:70], 0.0) + e.device_time / 1000.0
    top = dict(sorted(((k, round(v, 4)) for k, v in by_name.items()), key=lambda kv: -kv[1])[:12])
    return ms, len(kern), sum(e.device_time for e in kern) / 1000.0, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--queries", default="1,64")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--compile", default="none", help="comma list: none (the pieces as written) and/or a torch.compile "
                    "mode for the per-layer pieces (graphs.CompiledBlocks), e.g. none,default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a CPU: a smoke test of the roles only
    cfg = shape_config(args.shape)
    model = random_model(cfg, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    rate = copy_rate(dev)
    floor_ms = weight_bytes(cfg, torch.bfloat16) / rate * 1e3  # as `medusa bench --step-cost` (rate: read + write)
    roles = gemm_roles(cfg)
    doc = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "shape": args.shape, "torch": torch.__version__,
           "copy_rate_gbs": round(rate / 1e9, 1), "floor_ms": round(floor_ms, 3), "rows": []}
    print(f"{doc['device']}, {args.shape}: copy rate {rate / 1e9:.0f} GB/s, floor {floor_ms:.2f} ms", flush=True)
    for c in [int(x) for x in args.contexts.split(",")]:
        for n in [int(x) for x in args.queries.split(",")]:
            for mode in args.compile.split(","):
                ops = EAGER if mode == "none" else CompiledBlocks(model, "default" if mode == "" else mode)
                with torch.inference_mode():
                    replay = _forward_fn(model, c, n, graphs=True, ops=ops) if dev.type == "cuda" else None
                    ms, count, ksum, top = graph_profile(replay) if replay else (float("nan"), 0, 0.0, {})
                    eager = _forward_fn(model, c, n, graphs=False) if ops is EAGER else None
                    by_role = eager_roles(eager, roles, rate) if eager else []
                row = {"context": c, "queries": n, "compile": mode, "graph_ms": round(ms, 4), "x_floor": round(ms / floor_ms, 3),
                       "kernels": count, "kernel_sum_ms": round(ksum, 4), "roles": by_role, "top_kernels_ms": top}
                doc["rows"].append(row)
                print(f"\n## context {c}, {n} queries, compile {mode}: graph {ms:.3f} ms ({ms / floor_ms:.2f}x floor), "
                      f"{count} kernels summing {ksum:.3f} ms (gaps {ms - ksum:.3f} ms)")
                _print_roles(by_role, top)
                del replay, eager
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


def _print_roles(by_role: list[dict], top: dict) -> None:
    if by_role:
        print("| role | calls | GPU ms | weight MB | x copy rate |\n|---|---:|---:|---:|---:|")
        for r in by_role[:16]:
            print(f"| {r['role'][:60]} | {r['calls']} | {r['ms']:.3f} | {r.get('weight_mb', '')} | {r.get('x_copy_rate', '')} |")
    print("kernels:", json.dumps(top))


if __name__ == "__main__":
    main()
