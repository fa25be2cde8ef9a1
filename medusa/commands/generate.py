"""`medusa generate`: decode prompts through the one Engine: plain (--mode ar), always with
draft heads and tree verification (--mode spec), or by the engine's measured-cost choice
(--mode auto, the default), streaming text or printing one JSON object per prompt."""
from __future__ import annotations

import argparse
import json
import sys

from medusa.commands.common import HelpFormatter, Prompt, add_model_args, compile_arg, read_prompts
from medusa.commands.tp import add_tp_arg, run_ranks
from medusa.decoding.beam import BeamParams, check_params, parse_early_stopping
from medusa.decoding.generate import Stats, check_context, single_engine, stream
from medusa.decoding.logprobs import TOP_COMPUTED
from medusa.decoding.sampling import SamplingParams
from medusa.decoding.tree import load_tree
from medusa.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (speculatively by default)",
                       formatter_class=HelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file)")
    p.add_argument("--prompt-file", help='JSONL of {"id", "prompt"} or MT-Bench {"question_id", "turns"} rows')
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of --prompt-file")
    add_model_args(p)
    p.add_argument("--mode", choices=("auto", "ar", "spec"), default="auto",
                   help="auto: the engine picks plain decoding or a tree by measured step costs and acceptance; "
                        "ar: plain autoregressive; spec: always speculate with the tree")
    p.add_argument("--rule", choices=("greedy", "typical", "sample"), default=None,
                   help="acceptance rule (default: greedy at temperature 0, else sample)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0, or 1.0 with --rule sample/typical)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this much probability")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--posterior-threshold", type=float, default=0.09, help="typical acceptance epsilon")
    p.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance alpha")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="decode the prompts N at a time (one engine of max batch N); output stays in input order")
    p.add_argument("--no-graphs", action="store_true", help="on a GPU, run the decode step eagerly (no CUDA graphs; for debugging)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="on a GPU, torch.compile the per-layer pieces before capturing the step graphs (default: "
                        "where measured faster, graphed steps of one row; --no-compile: never)")
    p.add_argument("--beams", type=int, default=1, metavar="K",
                   help="beam search with K beams (greedy; HF generate's num_beams; 1: plain decoding)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: a finished beam's score is its log-probability / length ** this")
    p.add_argument("--early-stopping", default="false", metavar="{true,false,never}",
                   help="beam search: HF's early_stopping (true: stop once K beams are finished)")
    p.add_argument("--num-return", type=int, default=1, metavar="N",
                   help="beam search: print the N best beams (N <= K)")
    add_tp_arg(p)
    p.set_defaults(func=run)


def beams_from_args(args) -> BeamParams:
    """The beam search settings (bad values: a RequestError before anything loads)."""
    p = BeamParams(args.beams, args.length_penalty, parse_early_stopping(args.early_stopping), args.num_return)
    if p.beams != 1:
        check_params(p, 1, TOP_COMPUTED)  # the bound for the model's stop ids is checked on submit
        if not sampling_from_args(args).greedy:
            raise RequestError("beam search is greedy: --beams needs temperature 0 (no --rule sample/typical)")
    elif p.num_return != 1:
        raise RequestError("--num-return needs --beams K > 1")
    return p


def sampling_from_args(args) -> SamplingParams:
    rule = args.rule or ("greedy" if not args.temperature else "sample")
    temperature = args.temperature if args.temperature is not None else (0.0 if rule == "greedy" else 1.0)
    return SamplingParams(temperature=temperature, top_p=args.top_p, top_k=args.top_k, rule=rule,
                          posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha, seed=args.seed)


def prompts_from_args(args) -> list[Prompt]:
    if args.prompt is not None and args.prompt_file:
        raise RequestError("give a PROMPT or --prompt-file, not both")
    if args.prompt_file:
        return read_prompts(args.prompt_file, args.limit)
    if args.prompt is None:
        text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        if not text.strip():  # a terminal, or an empty pipe / /dev/null: never generate from nothing
            raise RequestError("no prompt: pass PROMPT, --prompt-file FILE, or pipe text on stdin")
        return [Prompt("stdin", text)]
    if not args.prompt.strip():
        raise RequestError("the prompt is empty")
    return [Prompt("0", args.prompt)]


def speculation_of(args, stack) -> str:
    """The engine's speculation switch: --mode ar plain, spec always the tree, auto the engine's
    measured-cost choice between plain decoding and its trees (a given --tree is always used)."""
    if args.mode == "ar" or stack.heads is None:
        return "off"
    return "on" if args.mode == "spec" or args.tree else "auto"


def build_engine(args, stack, encoded: list[list[int]], speculation: str):
    """One Engine for every prompt (max_batch: --concurrency, else 1), warmed up for what this
    run needs: on a GPU the step and prefill graphs are captured before the first request (and,
    for auto, step costs measured); on a CPU nothing is prepared ahead, the policy measures each
    step cost the first time it needs it."""
    from medusa.decoding.engine import Engine

    longest = max(map(len, encoded)) + args.max_new_tokens
    for ids in encoded:
        check_context(stack.model.cfg, len(ids), args.max_new_tokens)
    cuda = stack.model.device.type == "cuda" and not args.no_graphs
    compile_mode = compile_arg(args.compile) if cuda else None
    batch = max(min(args.concurrency or 1, len(encoded)), args.beams)  # a beam request takes K rows
    if speculation == "on":
        engine = single_engine(stack.model, stack.heads, stack.tree, max_seq_len=longest, graphs=cuda, max_batch=batch,
                               compile_mode=compile_mode)
    else:
        engine = Engine(stack.model, stack.heads if speculation != "off" else None, stack.tree, max_batch=batch,
                        max_seq_len=longest, graphs=cuda, compile_mode=compile_mode)
    if cuda:
        from tqdm import tqdm

        with tqdm(desc="preparing the engine", unit="step", file=sys.stderr, leave=False, disable=args.json) as bar:
            def progress(i, total):
                bar.total = total
                bar.update(i - bar.n)
            engine.warmup(max_kv_len=longest, trees=[engine.default_tree.name] if speculation != "auto" else None,
                          progress=progress, measure=speculation == "auto")
    return engine


def decoded_with(tree: str, nodes: dict) -> str:
    return "plain decoding" if tree == "ar" else f"tree {tree} with {nodes.get(tree, '?')} nodes"


def run(args) -> int:
    sampling_from_args(args)  # bad sampling values: one line before anything loads
    beams_from_args(args)
    if args.max_new_tokens < 1:
        raise RequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.concurrency is not None and args.concurrency < 1:
        raise RequestError(f"--concurrency must be >= 1, got {args.concurrency}")
    prompts = prompts_from_args(args)
    heads = "none" if args.mode == "ar" else args.heads
    if args.mode == "ar" and args.tree not in (None, "ar"):
        raise RequestError("--tree needs --mode spec or auto")
    if args.tree:
        load_tree(args.tree)  # validate before the (slower) model load
    if args.tp is not None:
        return run_ranks(args, decode_prompts, prompts, heads)
    return decode_prompts(args, prompts, heads)


def decode_prompts(args, prompts: list[Prompt], heads: str, group=None) -> int | None:
    """Load, build the engine and decode every prompt. group: this rank of --tp (rank 0 decodes
    and returns the exit code, the others replay its engine's steps and return None)."""
    from medusa.runtime import load_stack

    lead = group is None or group.rank == 0
    stack = load_stack(args.model, heads=heads, tree=args.tree, dtype=args.dtype, device=args.device,
                       progress=not args.json and lead, group=group)
    if group is None:
        return _decode(args, stack, prompts)
    from medusa.parallel.replica import replica

    with replica(group, stack.model, stack.heads) as driving:
        return _decode(args, stack, prompts) if driving else None


def _decode(args, stack, prompts: list[Prompt]) -> int:
    params = sampling_from_args(args)
    eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
    encoded = [stack.tokenizer.encode_prompt(pr.text, chat=not args.no_chat) for pr in prompts]
    speculation = speculation_of(args, stack)
    engine = build_engine(args, stack, encoded, speculation)
    if args.beams > 1:
        return run_beams(args, stack, engine, prompts, encoded, eos, speculation)
    if args.concurrency is not None:
        return run_batched(args, stack, engine, prompts, encoded, params, eos, speculation)
    nodes = {n: t.num_nodes for n, t in engine.trees.items()}
    for pr, ids in zip(prompts, encoded):
        stats = Stats()
        chunks = stream(engine, ids, params=params, max_new_tokens=args.max_new_tokens, stop_token_ids=eos,
                        stats=stats, speculation=speculation)
        out: list[int] = []
        if args.json:
            for c in chunks:
                out.extend(c.tokens)
            print(json.dumps({
                "id": pr.id, "prompt_token_ids": ids, "token_ids": out, "text": stack.tokenizer.decode(out),
                "new_tokens": stats.new_tokens, "steps": stats.steps, "mean_accepted": round(stats.mean_accepted, 4),
                "seconds": round(stats.seconds, 4), "tokens_per_s": round(stats.tokens_per_s, 2),
            }), flush=True)
            continue
        text = stack.tokenizer.stream()
        for c in chunks:
            sys.stdout.write(text.push(c.tokens))
            sys.stdout.flush()
        sys.stdout.write(text.flush() + "\n")
        print(f"[{pr.id}] {stats.new_tokens} new tokens, {stats.steps} steps, "
              f"{stats.mean_accepted:.2f} tokens/step accepted, {stats.tokens_per_s:.1f} tokens/s "
              f"(heads: {stack.heads_name}, mode {args.mode}: {decoded_with(stats.tree, nodes)}, "
              f"finish: {stats.finish_reason})", file=sys.stderr)
    return 0


def run_batched(args, stack, engine, prompts: list[Prompt], encoded: list[list[int]], params: SamplingParams, eos,
                speculation: str) -> int:
    """--concurrency N: every prompt is submitted to one Engine of max_batch N (the engine queues
    what does not fit), results are printed in input order as each becomes available."""
    import time

    from medusa.decoding.engine import Request

    t0 = time.perf_counter()
    total = 0
    with engine:
        handles = [engine.submit(Request(ids, max_new_tokens=args.max_new_tokens, sampling=params,
                                         stop_token_ids=eos, speculation=speculation)) for ids in encoded]
        for pr, ids, h in zip(prompts, encoded, handles):
            out, st = h.result()
            total += st.new_tokens
            if args.json:
                print(json.dumps({
                    "id": pr.id, "prompt_token_ids": ids, "token_ids": out, "text": stack.tokenizer.decode(out),
                    "new_tokens": st.new_tokens, "steps": st.steps, "mean_accepted": round(st.mean_accepted, 4),
                    "seconds": round(st.seconds, 4), "tokens_per_s": round(st.new_tokens / st.seconds, 2) if st.seconds else 0.0,
                    "ttft_s": round(st.ttft_s, 4), "tree": st.tree,
                }), flush=True)
                continue
            print(stack.tokenizer.decode(out), flush=True)
            print(f"[{pr.id}] {st.new_tokens} new tokens, {st.steps} steps, {st.mean_accepted:.2f} tokens/step accepted, "
                  f"{st.seconds:.2f} s (last tree: {st.tree})", file=sys.stderr)
        choice = engine.stats()["speculation"]
    wall = time.perf_counter() - t0
    print(f"{len(prompts)} prompts at concurrency {args.concurrency}: {total} new tokens in {wall:.2f} s = "
          f"{total / wall:.1f} tokens/s (heads: {stack.heads_name}; last speculation choice: "
          f"{choice.get('tree', 'ar')}, {choice.get('reason', '')})", file=sys.stderr)
    return 0


def run_beams(args, stack, engine, prompts: list[Prompt], encoded: list[list[int]], eos, speculation: str) -> int:
    """--beams K: each prompt's beam search (the engine runs one at a time); prints the best beam
    (and the --num-return best, with their scores), or with --json one object per prompt whose
    token_ids / text are the best beam's and "beams" lists the num_return best."""
    from medusa.decoding.engine import Request

    p = beams_from_args(args)
    for pr, ids in zip(prompts, encoded):
        h = engine.submit(Request(ids, max_new_tokens=args.max_new_tokens, stop_token_ids=eos, speculation=speculation,
                                  beams=p.beams, length_penalty=p.length_penalty, early_stopping=p.early_stopping,
                                  num_return=p.num_return))
        last = list(h)[-1]
        st, hyps = last.stats, last.beams
        best = list(hyps[0].tokens) if hyps else []
        beams = [{"token_ids": list(x.tokens), "text": stack.tokenizer.decode(list(x.tokens)), "score": round(x.score, 6)}
                 for x in hyps]
        if args.json:
            print(json.dumps({
                "id": pr.id, "prompt_token_ids": ids, "token_ids": best, "text": stack.tokenizer.decode(best),
                "new_tokens": st.new_tokens, "steps": st.steps, "mean_accepted": round(st.mean_accepted, 4),
                "seconds": round(st.seconds, 4), "tokens_per_s": round(st.new_tokens / st.seconds, 2) if st.seconds else 0.0,
                "beams": beams,
            }), flush=True)
            continue
        if len(beams) == 1:
            print(beams[0]["text"], flush=True)
        else:
            for i, b in enumerate(beams):
                print(f"--- beam {i + 1} (score {b['score']:.4f})\n{b['text']}", flush=True)
        print(f"[{pr.id}] beam search, {p.beams} beams: {st.new_tokens} new tokens, {st.steps} verification steps, "
              f"{st.mean_accepted:.2f} beam steps per verification, {st.seconds:.2f} s (tree: {st.tree}, "
              f"finish: {last.finish_reason})", file=sys.stderr)
    return 0
