"""`medusa bench --through grpc`: the serving overhead, the prompts streamed through a local
serving cluster (or a running `medusa serve`) and through the engine directly
(services.bench_grpc measures); prints the table and writes the JSON."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from medusa.commands.bench_common import at_least, int_list, slug
from medusa.commands.common import read_prompts
from medusa.errors import RequestError


def run_through(args) -> int:
    import json

    from medusa.bench.data import resolve_dataset

    at_least("--max-new-tokens", args.max_new_tokens, 1)
    try:
        from services.bench_grpc import bench_through_grpc
    except ImportError as e:
        raise RequestError(f"--through grpc needs the serve extra (pip install -e .[serve]): {e}") from None
    label, path = resolve_dataset(args.dataset)
    prompts = [p.text for p in read_prompts(path, args.limit or 8)]
    levels = int_list(args.concurrency, "--concurrency") if args.concurrency else [1]
    settings = {}
    if args.serve_config:
        from services.launch import read_config

        settings, _ = read_config(args.serve_config)
        settings.pop("autoscaling", None)  # the benchmark's cluster has one engine replica
    flags = {"model": args.model, "dtype": None if args.dtype == "auto" else args.dtype, "device": args.device,
             "tree": args.tree}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.target and not os.environ.get("MEDUSA_API_KEY"):
        raise RequestError("--target needs the server's API key in MEDUSA_API_KEY")
    res = bench_through_grpc(prompts, max_new_tokens=args.max_new_tokens, settings=settings, concurrency=levels,
                             target=args.target, api_key=os.environ.get("MEDUSA_API_KEY") if args.target else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{slug(args.name or f'grpc-{label}-' + str(settings.get('device', 'cpu')))}.json"
    dest.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}, indent=2))
    print("| concurrency | gRPC tok/s | engine tok/s | ratio | TTFT gRPC ms | TTFT engine ms | overhead ms | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for lv in res["levels"]:
        k = "tokens_per_s_total" if lv["concurrency"] > 1 else "tokens_per_s_median"
        print(f"| {lv['concurrency']} | {lv['grpc'][k]} | {lv['engine'][k]} | {lv['tokens_per_s_ratio']} | "
              f"{lv['grpc']['ttft_ms_median']} | {lv['engine']['ttft_ms_median']} | {lv['ttft_overhead_ms']} | "
              f"{lv['same_tokens']} |")
    print(f"wrote {dest.resolve()}", file=sys.stderr)
    return 0
