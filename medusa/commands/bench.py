"""`medusa bench`: the one benchmark entry point.

    medusa bench --dataset mt_bench --modes hf,ar,medusa,hydra --max-new-tokens 256 [--limit N]
    medusa bench --step-cost --shape llama-7b [--contexts 512,2048] [--queries 1,4,16,32,64,128]
    medusa bench --concurrency 1,4,16,64 --modes ar,spec

Each writes JSON + markdown (+ a PNG plot for decode runs) under --out (default ./bench-results,
in the current directory), named after the dataset or shape and the device, and prints the paths.
The measuring lives in medusa.bench; this module holds the arguments and picks the run:
bench_decode, bench_step_cost, bench_concurrency and bench_through load the model, show progress
and write the files (bench_common: what they share)."""
from __future__ import annotations

import argparse

from medusa.commands.bench_common import int_list  # noqa: F401 - importable from here, as before
from medusa.commands.bench_concurrency import run_concurrency
from medusa.commands.bench_decode import run_decode
from medusa.commands.bench_step_cost import run_step_cost
from medusa.commands.bench_through import run_through
from medusa.commands.common import HelpFormatter, add_model_args
from medusa.commands.tp import HELP as TP_HELP
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
