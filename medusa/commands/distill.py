"""`medusa distill`: self-distillation data for draft heads. Prompts from instruction files
(ShareGPT, Code Alpaca, Alpaca, GSM8K; never MT-Bench), chat template applied, greedy and
sampled responses from the base model through the batched engine, appended to a JSONL file;
rerunning skips what is done."""
from __future__ import annotations

import sys

from medusa.commands.common import HelpFormatter, add_model_args
from medusa.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("distill", help="write self-distillation data (base model responses) for head training",
                       formatter_class=HelpFormatter)
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                   help="prompt files: JSONL {id, prompt} | {question, answer}, or JSON lists {instruction, input, output}")
    p.add_argument("--out", required=True, help="JSONL output (appended; ids already there are skipped)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts of the mix")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest response per prompt, in tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts")
    p.add_argument("--sample-fraction", type=float, default=0.3, help="share of prompts answered by sampling (rest greedy)")
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled responses")
    p.add_argument("--batch", type=int, default=64, help="engine rows decoded together")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop (resumably) when reached")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt mix and of the sampled responses")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_model_args(p, heads=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from medusa.decoding.engine import Engine
    from medusa.runtime import load_stack
    from medusa.training.data import done_ids, mix_prompts, read_prompt_file, sampled_mode
    from medusa.training.distill import DistillJob, distill

    if args.max_new_tokens < 1 or args.batch < 1:
        raise RequestError("--max-new-tokens and --batch must be >= 1")
    if not 0.0 <= args.sample_fraction <= 1.0:
        raise RequestError(f"--sample-fraction must be in [0, 1], got {args.sample_fraction}")
    if args.temperature <= 0 and args.sample_fraction > 0:
        raise RequestError("--temperature must be > 0 for the sampled responses")
    prompts = mix_prompts([read_prompt_file(f) for f in args.prompts], seed=args.seed)
    if args.limit:
        prompts = prompts[: args.limit]
    stack = load_stack(args.model, heads="none", dtype=args.dtype, device=args.device)
    tok, model = stack.tokenizer, stack.model
    done = done_ids(args.out)
    jobs, too_long = [], 0
    for pr in tqdm(prompts, desc="tokenizing", unit="prompt", leave=False):
        mode = sampled_mode(pr.id, args.sample_fraction)
        jid = f"{pr.id}:{mode}"
        if jid in done:
            jobs.append(DistillJob(jid, mode, [0]))  # counted as skipped, never submitted
            continue
        ids = tok.encode_prompt(pr.text, chat=not args.no_chat)
        if len(ids) > args.max_prompt_tokens:
            too_long += 1
            continue
        jobs.append(DistillJob(jid, mode, ids))
    eos = tuple(sorted(set(model.cfg.eos_token_ids) | set(tok.eos_token_ids)))
    engine = Engine(model, max_batch=args.batch, max_seq_len=args.max_prompt_tokens + args.max_new_tokens)
    todo = sum(1 for j in jobs if j.id not in done)
    bar = tqdm(total=todo, desc="distilling", unit="resp")
    tokens = [0]

    def progress(n: int, ntok: int) -> None:
        tokens[0] += ntok
        bar.update(1)
        bar.set_postfix(tok_per_s=f"{tokens[0] / max(bar.format_dict['elapsed'], 1e-6):.0f}")

    engine.start()
    try:
        s = distill(engine, jobs, args.out, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    seed=args.seed, stop_token_ids=eos, window=args.batch + max(args.batch // 4, 2), time_limit=args.time_limit, progress=progress)
    finally:
        engine.stop()
        bar.close()
    print(f"distill: {s.written} responses ({s.tokens} tokens) written to {args.out} in {s.seconds:.0f}s, "
          f"{s.skipped} already there, {s.failed} not finished, {too_long} prompts over {args.max_prompt_tokens} tokens skipped",
          file=sys.stderr)
    return 0
