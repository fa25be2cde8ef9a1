"""`medusa bench`: the one benchmark entry point.

    medusa bench --dataset mt_bench --modes hf,ar,medusa,hydra --max-new-tokens 256 [--limit N]
    medusa bench --step-cost --shape llama-7b [--contexts 512,2048] [--queries 1,4,16,32,64,128]
    medusa bench --concurrency 1,4,16,64 --modes ar,spec

Each writes JSON + markdown (+ a PNG plot for decode runs) under --out (default ./bench-results,
in the current directory), named after the dataset or shape and the device, and prints the paths. The measuring lives in medusa.bench; this module parses
arguments, loads the model, shows progress and writes the files."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from medusa.commands.common import HelpFormatter, add_model_args, compile_arg, read_prompts
from medusa.commands.tp import HELP as TP_HELP, run_ranks
from medusa.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark decoding modes, step cost and concurrency",
                       formatter_class=HelpFormatter)
    add_model_args(p, heads=False)
    p.add_argument("--tree", help="tree for the speculative modes (name, dynamicN or JSON file; default: the heads' own, else tree16); "
                                  "pin one per mode with medusa:TREE in --modes; a +lookupN suffix adds a prompt-lookup chain "
                                  "of N nodes (greedy requests), alone (+lookup8) to the default tree")
    p.add_argument("--out", default="bench-results", help="folder for the JSON, markdown and PNG results, created if missing "
                                                         "(default: ./bench-results in the current directory)")
    p.add_argument("--name", help="file stem of the results (default: <dataset>-<device>, step-cost-<shape>-<device>, ...)")
    p.add_argument("--no-graphs", action="store_true", help="on a GPU, run our decode steps eagerly (no CUDA graphs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="on a GPU, torch.compile the per-layer pieces before capturing the step graphs (default: "
                        "where measured faster, graphed steps of one row; --no-compile: never)")
    d = p.add_argument_group("decode throughput (default)")
    d.add_argument("--dataset", default="mt_bench", help="mt_bench or a JSONL prompt file")
    d.add_argument("--modes", default=None,
                   help="comma list of hf, ar, medusa, hydra (spec modes may pin a tree: medusa:tree32); "
                        "with --concurrency: ar, spec [default: hf,ar,medusa,hydra; with --concurrency ar,spec]")
    d.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per prompt")
    d.add_argument("--limit", type=int, default=None, help="first N prompts only")
    d.add_argument("--warmup", type=int, default=1, help="prompts run once per mode before measuring (not counted)")
    d.add_argument("--no-chat", action="store_true", help="raw prompts (no chat template)")
    d.add_argument("--beams", type=int, default=1, metavar="K",
                   help="beam search with K beams in every mode (ar: plain, spec modes: speculative beam search, "
                        "hf: num_beams=K); tokens/s counts the best beam's tokens, 'output == ar' compares best beams")
    s = p.add_argument_group("step cost (--step-cost)")
    s.add_argument("--step-cost", action="store_true", help="time one forward by query count and context")
    s.add_argument("--shape", default="smollm2-135m", help="llama-7b | llama3-8b | smollm2-135m | tiny | a config.json path")
    s.add_argument("--contexts", default="512,2048", help="comma list of context lengths")
    s.add_argument("--queries", default="1,4,16,32,64,128", help="comma list of query-token counts")
    s.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per cell (at least 5 repeats)")
    c = p.add_argument_group("concurrency (--concurrency)")
    c.add_argument("--concurrency", default=None, help="comma list of concurrent request counts, e.g. 1,4,16,64")
    c.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x concurrency, >= 8)")
    c.add_argument("--repeats", type=int, default=1,
                   help="timed runs per cell; the modes' warm engines alternate, and the ratios to ar are taken run by run")
    c.add_argument("--step-cost-table", help="a `medusa bench --step-cost` JSON for the engine's adaptive speculation")
    c.add_argument("--tp", type=int, default=None, metavar="N", help=TP_HELP + " (with --concurrency)")
    g = p.add_argument_group("serving overhead (--through grpc)")
    g.add_argument("--through", choices=["grpc"], default=None,
                   help="stream the prompts through a local serving cluster (Ray Serve + Redis + gRPC, CPU) and "
                        "through the engine directly, interleaved: tokens/s ratio and time-to-first-token overhead "
                        "(needs the serve extra and redis-server); with --concurrency at each level")
    g.add_argument("--serve-config", metavar="PATH",
                   help="with --through: the app's settings from this Ray Serve config (e.g. deploy/serve_config.yaml); "
                        "--model, --dtype, --device override them (default: the laptop defaults, CPU)")
    g.add_argument("--target", metavar="HOST:PORT",
                   help="with --through: a running `medusa serve` (its key in MEDUSA_API_KEY) instead of a cluster "
                        "started for the run; the direct engine is built here from the same settings")
    p.set_defaults(func=run)


def int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RequestError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise RequestError(f"{flag} takes positive integers, got {text!r}")
    return vals


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "custom"


def _device(args):
    import torch

    try:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise RequestError(f"unknown device {args.device!r}: use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("--device cuda but no CUDA device is available")
    return dev


def _load_average():
    from medusa.bench.env import load_average

    return load_average()


def _at_least(flag: str, value: int | None, least: int) -> None:
    """One clear line for a numeric option below its minimum (None: not given, fine)."""
    if value is not None and value < least:
        raise RequestError(f"{flag} must be >= {least}, got {value}")


def _publish(doc: dict, out: Path, stem: str, markdown) -> int:
    """Stamp the end load, write `stem`.json and .md under `out`, print the markdown; exit 0."""
    doc["load_average_end"] = _load_average()
    md = markdown(doc)
    paths = _write(out, stem, doc, md)
    print(md)
    print("wrote " + ", ".join(str(p.resolve()) for p in paths), file=sys.stderr)
    return 0


def _write(out: Path, stem: str, doc: dict, markdown: str) -> list[Path]:
    from medusa.bench.report import write_json

    paths = [write_json(doc, out / f"{stem}.json")]
    (out / f"{stem}.md").write_text(markdown)
    paths.append(out / f"{stem}.md")
    return paths


def run(args) -> int:
    if sum(map(bool, (args.step_cost, args.concurrency and not args.through, args.through))) > 1:
        raise RequestError("choose one of --step-cost, --concurrency and --through (--through takes --concurrency)")
    if (args.serve_config or args.target) and not args.through:
        raise RequestError("--serve-config and --target go with --through grpc")
    if args.tp is not None and not args.concurrency:
        raise RequestError("--tp runs with --concurrency (the engine's benchmark); --step-cost, --through and the "
                           "decode modes (several heads families at once, HF) run on one device")
    if args.through:
        return run_through(args)
    if args.step_cost:
        return run_step_cost(args)
    if args.concurrency:
        return run_concurrency(args)
    return run_decode(args)


# ------------------------------------------------------------------ serving overhead

def run_through(args) -> int:
    import json

    from medusa.bench.data import resolve_dataset

    _at_least("--max-new-tokens", args.max_new_tokens, 1)
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
    dest = out / f"{_slug(args.name or f'grpc-{label}-' + str(settings.get('device', 'cpu')))}.json"
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


# ------------------------------------------------------------------ decode throughput

def run_decode(args) -> int:
    import torch
    from tqdm import tqdm

    from medusa.bench import decode, report
    from medusa.bench.data import resolve_dataset
    from medusa.bench.env import environment
    from medusa.model.loading import load_model
    from medusa.runtime import parse_dtype, tqdm_progress
    from medusa.tokenizer import Tokenizer

    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--limit", args.limit, 1)
    _at_least("--warmup", args.warmup, 0)
    _at_least("--beams", args.beams, 1)
    if args.beams > 8:
        raise RequestError(f"--beams must be at most 8, got {args.beams}")
    specs = decode.parse_modes(args.modes or "hf,ar,medusa,hydra")
    label, path = resolve_dataset(args.dataset)
    prompts = read_prompts(path, args.limit)
    dev = _device(args)
    model, src = load_model(args.model, dtype=parse_dtype(args.dtype, dev), device=dev, progress=tqdm_progress())
    tok = Tokenizer.load(src)
    eos = tuple(sorted(set(model.cfg.eos_token_ids) | set(tok.eos_token_ids)))
    ids = [tok.encode_prompt(p.text, chat=not args.no_chat) for p in prompts]
    longest = max(len(i) for i in ids) + args.max_new_tokens
    if longest > model.cfg.max_position_embeddings:
        raise RequestError(f"the longest prompt + --max-new-tokens = {longest} tokens exceeds the model's context "
                           f"of {model.cfg.max_position_embeddings}")
    graphs = dev.type == "cuda" and not args.no_graphs
    modes, skipped = decode.prepare_modes(specs, model, src, eos, cli_tree=args.tree, longest=longest, graphs=graphs,
                                          compile_mode=compile_arg(args.compile) if graphs else None, beams=args.beams)
    for lab, why in skipped.items():
        print(f"medusa bench: {lab}: {why}", file=sys.stderr)
    if not modes:
        raise RequestError("no mode left to run")
    env = environment(dev)  # date and load average at the start of the measurement
    warm = min(args.warmup, len(ids))
    bar = tqdm(total=len(modes) * (len(ids) + warm), desc="bench", unit="run", file=sys.stderr)

    def on_run(mode_label: str, i: int) -> None:
        bar.set_postfix_str(mode_label if i < 0 else f"prompt {i + 1}/{len(ids)} {mode_label}")
        bar.update()

    results = decode.run_modes(modes, ids, args.max_new_tokens, warmup=warm, on_run=on_run)
    bar.close()
    spec_modes = [m for m in modes if m.spec.kind == "spec"]
    ar_label = next((m.label for m in modes if m.spec.kind == "ar"), None)
    doc = {
        "kind": "decode",
        "dataset": label,
        **env,
        "model": src.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_new_tokens": args.max_new_tokens,
        "beams": args.beams,
        "num_prompts": len(ids),
        "warmup": warm,
        "chat_template": not args.no_chat,
        "graphs": graphs,
        "compile": any(m.compiled for m in modes),
        "heads": spec_modes[0].heads_label if spec_modes else None,
        "tree": spec_modes[0].tree.name if spec_modes else None,
        "tree_nodes": spec_modes[0].tree.num_nodes if spec_modes else None,
        "modes": report.summarise(modes, results),
        "skipped": skipped,
        "notes": [],
        "prompts": [report.prompt_record(p.id, len(i), row, ar_label) for p, i, row in zip(prompts, ids, results)],
    }
    golden = [lab for lab, s in doc["modes"].items() if s["kind"] == "spec" and s["matches_ar_all"] is False]
    if golden and model.dtype == torch.float32:
        doc["notes"].append(f"GOLDEN CHECK FAILED: {', '.join(golden)} output differs from ar on some prompts")
    elif golden:  # half precision: a wide verification forward rounds differently from a 1-token one
        doc["notes"].append(
            f"golden check not exact in {str(model.dtype).removeprefix('torch.')}: {', '.join(golden)} output "
            "differs from ar on some prompts (near-tie argmax flips between a tree-wide and a one-token "
            "forward); rerun with --dtype float32 for the exact check")
    doc["load_average_end"] = _load_average()
    out, stem = Path(args.out), _slug(args.name or f"{label}-{doc['device']}")
    paths = _write(out, stem, doc, report.decode_markdown(doc))
    png = report.decode_plot(doc, out / f"{stem}.png")
    paths += [png] if png else []
    print(report.decode_markdown(doc))
    print("wrote " + ", ".join(str(p.resolve()) for p in paths), file=sys.stderr)
    return 1 if golden else 0


# ------------------------------------------------------------------ step cost

def run_step_cost(args) -> int:
    from tqdm import tqdm

    from medusa.bench import step_cost as sc
    from medusa.bench.env import environment
    from medusa.runtime import parse_dtype

    contexts, queries = int_list(args.contexts, "--contexts"), int_list(args.queries, "--queries")
    if args.budget <= 0:
        raise RequestError(f"--budget must be > 0, got {args.budget}")
    dev = _device(args)
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
    shape = _slug(Path(args.shape).parent.name if args.shape.endswith("config.json") else Path(args.shape).name)
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
    return _publish(doc, Path(args.out), _slug(args.name or f"step-cost-{shape}-{doc['device']}"), sc.step_cost_markdown)


# ------------------------------------------------------------------ concurrency

def run_concurrency(args) -> int:
    try:
        import medusa.decoding.engine  # noqa: F401
    except ImportError:
        raise RequestError("--concurrency is not available until the batched engine (medusa.decoding.engine) lands") from None
    import json

    from medusa.bench import concurrency as cc
    from medusa.bench.data import resolve_dataset

    levels = int_list(args.concurrency, "--concurrency")
    modes = cc.parse_modes(args.modes or "ar,spec")
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--requests", args.requests, 1)
    _at_least("--repeats", args.repeats, 1)
    table = None
    if args.step_cost_table:
        try:
            table = json.loads(Path(args.step_cost_table).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RequestError(f"cannot read --step-cost-table {args.step_cost_table}: {e}") from None
    label, path = resolve_dataset(args.dataset)
    prompts = read_prompts(path, args.limit)
    if args.tp is not None:
        return run_ranks(args, _concurrency, label, prompts, levels, modes, table)
    return _concurrency(args, label, prompts, levels, modes, table)


def _concurrency(args, label: str, prompts, levels: list[int], modes: list[str], table, group=None) -> int | None:
    """Load, measure and publish; group: this rank of --tp (rank 0 measures, the others replay
    its engines' steps and return None)."""
    from medusa.runtime import load_stack

    if group is None:
        dev = _device(args)
    else:
        from medusa.parallel.replica import replica

        dev = group.device
    stack = load_stack(args.model, heads="none" if modes == ["ar"] else "default", tree=args.tree,
                       dtype=args.dtype, device=str(dev), progress=group is None or group.rank == 0, group=group)
    if group is None:
        return _measure_concurrency(args, label, prompts, levels, modes, table, stack, dev)
    with replica(group, stack.model, stack.heads) as driving:
        return _measure_concurrency(args, label, prompts, levels, modes, table, stack, dev) if driving else None


def _measure_concurrency(args, label, prompts, levels, modes, table, stack, dev) -> int:
    from tqdm import tqdm

    from medusa.bench import concurrency as cc
    from medusa.bench.env import environment

    tok = stack.tokenizer
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(tok.eos_token_ids)))
    ids = [tok.encode_prompt(p.text, chat=not args.no_chat) for p in prompts]
    if stack.heads is None and modes != ["ar"]:
        raise RequestError("no draft heads available for the spec/auto modes")
    env = environment(dev)
    total = len(modes) * args.repeats * sum(args.requests or max(8, 2 * c) for c in levels)
    bar = tqdm(total=total, desc="concurrency", unit="req", file=sys.stderr)

    def preparing(done: int, total: int) -> None:  # each engine's warm-up (graph captures, step timing)
        bar.set_postfix_str(f"preparing engine {done}/{total}" if done < total else "", refresh=True)

    rows = cc.run_concurrency(stack.model, stack.heads, stack.tree, ids, levels, modes, args.max_new_tokens, eos,
                              requests=args.requests, step_cost=cc.step_cost_table(table, max(map(len, ids))),
                              on_done=bar.update, graphs=False if args.no_graphs else None, on_prepare=preparing,
                              repeats=args.repeats)
    bar.close()
    doc = {
        "kind": "concurrency", "dataset": label, **env, "model": stack.source.name,
        "dtype": str(stack.model.dtype).removeprefix("torch."), "max_new_tokens": args.max_new_tokens,
        "heads": stack.heads_name, "tree": stack.tree.name, "tree_nodes": stack.tree.num_nodes,
        "step_cost_table": Path(args.step_cost_table).name if args.step_cost_table else None, "rows": rows,
        "tensor_parallel": args.tp or 1,
    }
    return _publish(doc, Path(args.out), _slug(args.name or f"concurrency-{label}-{doc['device']}"), cc.concurrency_markdown)
