"""`medusa bench --step-cost`: the time of one forward of a random model of a given shape by
query count and context (medusa.bench.step_cost measures)."""
from __future__ import annotations

import sys
from pathlib import Path

from medusa.commands.bench_common import device_of, int_list, publish, slug
from medusa.errors import RequestError


def run_step_cost(args) -> int:
    from tqdm import tqdm

    from medusa.bench import step_cost as sc
    from medusa.bench.env import environment
    from medusa.runtime import parse_dtype

    contexts, queries = int_list(args.contexts, "--contexts"), int_list(args.queries, "--queries")
    if args.budget <= 0:
        raise RequestError(f"--budget must be > 0, got {args.budget}")
    dev = device_of(args)
    cfg = sc.shape_config(args.shape)
    need_pos = max(contexts) + max(queries)
    if need_pos > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=need_pos)
    max_len = -(-need_pos // 64) * 64
    dtype, dtype_note = sc.pick_dtype(cfg, parse_dtype(args.dtype, dev), dev, max_len)
    if dtype_note:
        print(f"medusa bench: {dtype_note}", file=sys.stderr)
    print(f"medusa bench: building a random {args.shape} ({cfg.num_params / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    env = environment(dev)
    model = sc.random_model(cfg, dtype, dev)
    rate = sc.copy_rate(dev)
    wbytes = sc.weight_bytes(cfg, dtype)
    floor = wbytes / rate
    graphs = not args.no_graphs and dev.type == "cuda"
    bar = tqdm(total=len(contexts) * len(queries) * (2 if graphs else 1), desc="step cost", unit="cell", file=sys.stderr)

    def on_row(r: dict) -> None:
        bar.set_postfix_str(f"ctx {r['context']} q {r['queries']}: {r['seconds_median'] * 1e3:.2f} ms")
        bar.update()

    rows, graphs_note = sc.measure(model, contexts, queries, graphs, budget_s=args.budget, on_row=on_row)
    bar.close()
    sc.add_ratios(rows, floor)
    shape = slug(Path(args.shape).parent.name if args.shape.endswith("config.json") else Path(args.shape).name)
    doc = {
        "kind": "step_cost",
        "shape": shape,
        **env,
        "params": cfg.num_params,
        "config": cfg.to_hf(),
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_note": dtype_note,
        "weight_bytes": wbytes,
        "copy_rate_gbs": round(rate / 1e9, 3),
        "floor_s": round(floor, 6),
        "graphs": None if (graphs and graphs_note) else graphs,
        "graphs_note": graphs_note if graphs else ("--no-graphs" if args.no_graphs else "CPU: no CUDA graphs"),
        "rows": rows,
    }
    if doc["graphs"] is None:
        rows_ok = [r for r in rows if not r["graphs"]]
        doc["rows"] = rows_ok
    return publish(doc, Path(args.out), slug(args.name or f"step-cost-{shape}-{doc['device']}"), sc.step_cost_markdown)
