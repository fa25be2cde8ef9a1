"""Where the time of one graphed decode step goes, on a GPU (default model, batch 1).

For the AR step and each shipped head set with its tree, after a 200-token prompt:
  wall      median host time of one `Runner.step` (the engine's runner) plus the read-back of the accepted
            length (what the decode loop pays per step), over 60 steps from the prompt on
  replay    mean GPU time of one graph replay alone (CUDA events, 200 back-to-back replays), at
            --at committed tokens for every mode (one KV bucket; results before this option
            timed each mode where its 60 steps ended, which depends on its acceptance)
  kernels   number of kernels in one replay and the sum of their GPU durations (torch.profiler)
so wall - replay is host overhead, replay - kernel sum is launch gaps inside the graph.
With --ops, the same step once more, eagerly, on a scratch copy of the state, with the GPU time
of each aten operator (what launched the kernels; the graph replay shows kernel names only).

  [MEDUSA_ATTENTION=auto|torch|sdpa|matmul|triton] python3 scripts/gpu/profile_step.py [--compile MODE] [--ops]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from medusa.decoding.generate import single_engine
from medusa.decoding.kv_pool import scratch_state
from medusa.decoding.runner import GraphKey
from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.step import DecodeState, speculate
from medusa.decoding.tree import build_tree, load_tree
from medusa.kernels import attention_choice
from medusa.runtime import load_stack, resolve_heads


def op_profile(model, heads, tree, runner, committed: int, top: int = 30) -> list[dict]:
    """GPU time per aten operator (self time, summed over calls) of one eager step at the graph's
    KV bucket, run on scratch copies of the per-row state (the cache slots it writes lie past
    the committed tokens)."""
    kv_len = runner.kv_len(committed, tree.num_nodes)
    dev_tree = tree.to(model.device)
    sampling = BatchSampling.stack([SamplingParams()], model.device)

    def once():
        v = runner._view(1)
        st = DecodeState(v.cache, v.start.clone(), v.root.clone(), v.last_hidden.clone(), scratch_state(v.head_state), v.draft)
        speculate(model, heads, dev_tree, st, sampling, None, kv_len=kv_len)

    once()
    torch.cuda.synchronize()
    verbose = torch._C._profiler._ExperimentalConfig(verbose=True)  # keeps Python frames on operator events
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True, experimental_config=verbose) as prof:
        once()
        torch.cuda.synchronize()
    agg: dict[str, list] = {}
    for e in prof.events():
        us = getattr(e, "self_device_time_total", 0.0)
        if us <= 0 or not e.name.startswith("aten::"):
            continue
        # the operator and the innermost line of ours that called it
        ours = next((f.split("medusa/", 1)[-1] for f in (e.stack or []) if "medusa/" in f and "profile_step" not in f), "?")
        a = agg.setdefault(f"{e.name} @ {ours}", [0, 0.0])
        a[0] += 1
        a[1] += us / 1000.0
    rows = [{"op": k, "calls": n, "ms": round(ms, 4)} for k, (n, ms) in agg.items()]
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", default=None, metavar="MODE", help="torch.compile mode for the per-layer pieces (default, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ops", action="store_true", help="also attribute an eager step's GPU time to aten operators")
    ap.add_argument("--top", type=int, default=30, help="operators kept per mode with --ops")
    ap.add_argument("--at", type=int, default=384,
                    help="committed tokens at which every mode's graph replay is timed (the same KV bucket for all)")
    ap.add_argument("--heads", default="ar,medusa,hydra",
                    help="comma list: ar, the shipped medusa / hydra, or heads folders (each with its own tree)")
    args = ap.parse_args()
    stack = load_stack(heads="none", progress=False)
    model = stack.model
    rows = []
    for name in args.heads.split(","):
        heads, tree = None, load_tree("ar")
        if name != "ar":
            heads, _ = resolve_heads(name, model, stack.source)
            tree = build_tree(heads.config.tree, name=f"{Path(name).name}-tree")
        engine = single_engine(model, heads, tree, max_seq_len=1024, graphs=True, compile_mode=args.compile)
        runner, tree = engine.runner, engine.default_tree  # the engine's runner and its device tree
        start = runner.rows.start
        sampling = BatchSampling.stack([SamplingParams()], model.device)
        prompt = torch.randint(0, model.cfg.vocab_size, (1, 200), device=model.device)
        with torch.inference_mode():
            lengths = torch.full((1,), 200, device=model.device)
            runner.prefill(0, prompt, [0], lengths, sampling, None)
            committed = 200
            walls = []
            for i in range(60):  # the loop's own pattern: replay, read the length back
                t = time.perf_counter()
                acc, _ = runner.step(tree, 1, [committed], sampling, "greedy", None, None, [])
                n = int(acc.length[0]) + 1
                walls.append(time.perf_counter() - t)
                committed += n
            # time the graph at the same context for every mode (--at committed tokens, so the
            # same KV bucket: where the 60 steps ended depends on acceptance, and a larger bucket
            # costs more, e.g. softmax kernels of 0.1 ms more per step between 448 and 576 slots);
            # the cache slots past what was committed hold finite left-overs, which only the
            # timing sees. Each replay advances `start`, so it is put back before each one (one
            # tiny copy kernel, timed with it)
            committed = args.at
            start.fill_(committed)
            saved = start.clone()
            runner.step(tree, 1, [committed], sampling, "greedy", None, None, [])
            start.copy_(saved)
            key = GraphKey("step", 1, (tree.name, tree.paths, tree.lookup), runner.kv_len(committed, tree.num_nodes))
            g = runner.graphs[key].graph
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(200):
                start.copy_(saved)
                g.replay()
            e1.record()
            torch.cuda.synchronize()
            replay_ms = e0.elapsed_time(e1) / 200
            start.copy_(saved)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                g.replay()
                torch.cuda.synchronize()
            kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
            ksum = sum(e.device_time for e in kern) / 1000.0  # us -> ms
            top = {}
            for e in kern:
                top[e.name[:60]] = top.get(e.name[:60], 0.0) + e.device_time / 1000.0
            ops = op_profile(model, heads, tree, runner, committed, top=args.top) if args.ops else None
        row = {"mode": name, "nodes": tree.num_nodes, "at": args.at, "wall_ms": 1000 * statistics.median(walls[10:]),
               "replay_ms": replay_ms, "kernels": len(kern), "kernel_sum_ms": ksum,
               "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])}
        if ops is not None:
            row["top_ops"] = ops
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_ops"}), flush=True)
        for op in ops or []:
            print(f"  {op['op'][:100]:100s} {op['calls']:5d} calls {op['ms']:7.3f} ms")
        del runner
        torch.cuda.empty_cache()
    print("\n| mode | nodes | step wall (ms) | graph replay (ms) | kernels | kernel time (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['nodes']} | {r['wall_ms']:.3f} | {r['replay_ms']:.3f} | {r['kernels']} | {r['kernel_sum_ms']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "compile": args.compile, "attention": attention_choice.ATTENTION, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
