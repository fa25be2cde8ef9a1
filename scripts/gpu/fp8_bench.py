"""FP8 against bfloat16 on the llama3-8b shape (issue 28's measurements), on one GPU:

  python scripts/gpu/fp8_bench.py --dir /tmp/ck8b --out $OUT/fp8   # ~6-8 minutes on an H100

1. writes two random checkpoints of the shape as sharded safetensors on the machine's disk
   (scripts/load_bench.py: bf16, and FP8 e4m3 projections with per-channel weight_scale),
2. loads each in a fresh subprocess onto the GPU: load time, peak host RSS, peak GPU memory,
3. times one verification forward (medusa.bench.step_cost.measure: 1-token and 64-node steps at
   contexts 512 and 2048, eager and CUDA-graphed) for each, against each one's copy-rate floor
   (its own weight bytes / the measured device copy rate).

Writes fp8-bench.json and fp8-bench.md under --out and prints the markdown."""
from __future__ import annotations

import argparse
import json
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
    for kind, d in dirs.items():
        model, _ = load_model(d, dtype=torch.bfloat16, device=dev)
        assert has_fp8_linears(model) == (kind == "fp8")
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
    lines = [f"### FP8 vs bfloat16, {a.shape} shape on {doc.get('device')}", "",
             f"_scaled_mm: {doc['scaled_mm']}; copy rate {doc['copy_rate_gbs']} GB/s (read + write)", "",
             "| weights | disk GiB | load s | peak host RSS GiB | peak GPU GiB |", "|---|---:|---:|---:|---:|"]
    for r in doc["loads"]:
        lines.append(f"| {r['kind']} | {r['disk_gib']} | {r['seconds']} | {r['peak_rss_gib']} | {r['gpu_peak_gib']} |")
    lines += ["", "| weights | context | graphs | queries | ms | floor ms | x floor |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in doc["steps"]:
        lines.append(f"| {r['kind']} | {r['context']} | {'on' if r['graphs'] else 'off'} | {r['queries']} | "
                     f"{r['seconds_median'] * 1e3:.2f} | {r['floor_ms']:.2f} | {r['x_floor']} |")
    md = "\n".join(lines) + "\n"
    (out / "fp8-bench.json").write_text(json.dumps(doc, indent=1))
    (out / "fp8-bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
