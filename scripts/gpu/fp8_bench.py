"""FP8 against bfloat16 on the llama3-8b shape (issue 28's measurements), on one GPU:

  python scripts/gpu/fp8_bench.py --dir /tmp/ck8b --out $OUT/fp8   # ~6-8 minutes on an H100

1. writes two random checkpoints of the shape as sharded safetensors on the machine's disk
   (scripts/load_bench.py: bf16, and FP8 e4m3 projections with per-channel weight_scale),
2. loads each in a fresh subprocess onto the GPU: load time, peak host RSS, peak GPU memory,
3. times one verification forward (medusa.bench.step_cost.measure: 1-token and 64-node steps at
   contexts 512 and 2048, eager and CUDA-graphed) for each, against each one's copy-rate floor
   (its own weight bytes / the measured device copy rate),
4. times each projection of the shape alone (q/k/v fused and not, o, gate/up fused and not,
   down) at M = 1, 16, 64 rows: bfloat16 F.linear, FP8 `_scaled_mm` (activations quantised per
   row) and the FP8 Triton weight-only kernel (medusa.kernels.fp8_linear), median microseconds
   per call in a CUDA graph over enough weight copies to defeat the L2 cache, and GB/s of
   weight bytes (under a minute; `--projections-only` runs just this part).

Writes fp8-bench.json and fp8-bench.md under --out and prints the markdown."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: load_bench

import load_bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ck8b")
    ap.add_argument("--out", default="fp8-out")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--queries", default="1,64")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--projections-only", action="store_true", help="only part 4, the per-projection table")
    a = ap.parse_args()
    import torch

    from medusa.bench import step_cost as sc
    from medusa.bench.env import environment
    from medusa.model.fp8 import has_fp8_linears, scaled_mm_supported
    from medusa.model.loading import load_model

    dev = torch.device("cuda")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"shape": a.shape, **environment(dev), "scaled_mm": scaled_mm_supported(dev), "loads": [], "steps": []}
    if a.projections_only:
        doc["projections"] = projections(dev, sc.shape_config(a.shape))
        md = "\n".join(projection_table(doc, a.shape)) + "\n"
        (out / "fp8-projections.json").write_text(json.dumps(doc, indent=1))
        (out / "fp8-projections.md").write_text(md)
        print(md)
        return
    dirs = {"bf16": Path(a.dir + "-bf16"), "fp8": Path(a.dir + "-fp8")}
    for kind, d in dirs.items():
        if not (d / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            load_bench.write(d, a.shape, fp8=kind == "fp8", shard_gb=5.0, device="cuda")
            print(f"wrote {kind} checkpoint in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        r = load_bench.load(str(d), "bfloat16", "cuda", None)
        r.update(kind=kind, disk_gib=round(disk / 2**30, 3))
        doc["loads"].append(r)
        print(json.dumps(r), file=sys.stderr)
    contexts = [int(x) for x in a.contexts.split(",")]
    queries = [int(x) for x in a.queries.split(",")]
    rate = sc.copy_rate(dev)
    doc["copy_rate_gbs"] = round(rate / 1e9, 1)
    # the FP8 model twice: its default path (_scaled_mm at every size) and the opt-in weight-only
    # kernel for decode-sized GEMMs (MEDUSA_FP8_KERNEL=triton, read at each call)
    for kind, d in [*dirs.items(), ("fp8-triton", dirs["fp8"])]:
        os.environ["MEDUSA_FP8_KERNEL"] = "triton" if kind == "fp8-triton" else "scaled_mm"
        model, _ = load_model(d, dtype=torch.bfloat16, device=dev)
        assert has_fp8_linears(model) == kind.startswith("fp8")
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = wbytes / rate
        rows, note = sc.measure(model, contexts, queries, graphs=True, budget_s=a.budget)
        sc.add_ratios(rows, floor)
        for r in rows:
            r.update(kind=kind, weight_gib=round(wbytes / 2**30, 3), floor_ms=round(floor * 1e3, 3))
        doc["steps"] += rows
        doc.setdefault("graphs_note", note)
        del model
        torch.cuda.empty_cache()
    doc["projections"] = projections(dev, sc.shape_config(a.shape))
    lines = [f"### FP8 vs bfloat16, {a.shape} shape on {doc.get('device')}", "",
             f"_scaled_mm: {doc['scaled_mm']}; copy rate {doc['copy_rate_gbs']} GB/s (read + write)", "",
             "| weights | disk GiB | load s | peak host RSS GiB | peak GPU GiB |", "|---|---:|---:|---:|---:|"]
    for r in doc["loads"]:
        lines.append(f"| {r['kind']} | {r['disk_gib']} | {r['seconds']} | {r['peak_rss_gib']} | {r['gpu_peak_gib']} |")
    lines += ["", "| weights | context | graphs | queries | ms | floor ms | x floor |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in doc["steps"]:
        lines.append(f"| {r['kind']} | {r['context']} | {'on' if r['graphs'] else 'off'} | {r['queries']} | "
                     f"{r['seconds_median'] * 1e3:.2f} | {r['floor_ms']:.2f} | {r['x_floor']} |")
    lines += ["", *projection_table(doc, a.shape)]
    md = "\n".join(lines) + "\n"
    (out / "fp8-bench.json").write_text(json.dumps(doc, indent=1))
    (out / "fp8-bench.md").write_text(md)
    print(md)


def projections(dev, cfg, rows=(1, 16, 64), l2_multiple=4, calls=20, repeats=7) -> list[dict]:
    """Each projection shape of `cfg` alone, per path and row count: median microseconds per call
    (`calls` calls captured in one CUDA graph, `repeats` replays), cycling over enough weight
    copies that they exceed `l2_multiple` x 50 MB (the weights come from HBM, as in a model)."""
    import torch
    import torch.nn.functional as F

    from medusa import kernels
    from medusa.kernels import fp8_linear
    from medusa.model import fp8

    D, Dh, H, Hkv, Fi = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    shapes = [("q/k/v fused", (H + 2 * Hkv) * Dh, D), ("q, o", H * Dh, D), ("k, v", Hkv * Dh, D),
              ("gate/up fused", 2 * Fi, D), ("gate, up", Fi, D), ("down", D, Fi)]
    triton_ok = kernels.enabled(dev) and fp8.scaled_mm_supported(dev)
    out = []
    for name, n, k in shapes:
        copies = max(2, -(-l2_multiple * 50_000_000 // (n * k)))  # counted at one byte a weight
        n_calls = max(calls, copies)
        w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(min(copies, 2))]
        w16 = [w16[i % len(w16)].clone() for i in range(copies)]
        q8 = [fp8.quantize_weight(w) for w in w16]
        paths = {"bf16 F.linear": (lambda x, i: F.linear(x, w16[i]), 2),
                 "fp8 _scaled_mm": (lambda x, i: fp8._scaled_mm(x, q8[i][0], q8[i][1], None), 1)}
        if triton_ok:
            paths["fp8 Triton"] = (lambda x, i: fp8_linear.fp8_matmul(x, q8[i][0], q8[i][1]), 1)
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for path, (fn, width) in paths.items():
                for i in range(copies):  # eager first: Triton tunes here, never in the capture
                    fn(x, i)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for c in range(n_calls):
                        fn(x, c % copies)
                times = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    g.replay()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3 / n_calls)  # us per call
                us = sorted(times)[len(times) // 2]
                out.append(dict(projection=name, n=n, k=k, rows=m, path=path, us=round(us, 2),
                                weight_gbs=round(n * k * width / us / 1e3, 1)))
                del g
        del w16, q8
        torch.cuda.empty_cache()
    return out


def projection_table(doc: dict, shape: str) -> list[str]:
    """The per-projection rows as markdown: one line per projection and row count, the paths
    side by side (us, and GB/s of weight bytes)."""
    rows = doc.get("projections") or []
    paths = list(dict.fromkeys(r["path"] for r in rows))
    lines = [f"### One projection alone, {shape} shape (us per call in a CUDA graph; GB/s of weight bytes)", "",
             "| projection | N x K | M | " + " | ".join(paths) + " |", "|---|---|---:|" + "---:|" * len(paths)]
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["projection"], r["n"], r["k"], r["rows"]), {})[r["path"]] = f"{r['us']} us, {r['weight_gbs']} GB/s"
    for (name, n, k, m), by_path in cells.items():
        lines.append(f"| {name} | {n} x {k} | {m} | " + " | ".join(by_path.get(p, "-") for p in paths) + " |")
    return lines


if __name__ == "__main__":
    main()
