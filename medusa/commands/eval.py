"""`medusa eval heads`: per-head top-1 .. top-k accuracy on held-out distilled data (Hydra
heads under teacher forcing), as a table and JSON (the input of `medusa tree`).
`medusa eval quality`: how close the backbone that heads trained jointly (Medusa-2) decode with
stays to the original model on held-out prompts (medusa.training.quality), against a stated bar."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from medusa.commands.common import HelpFormatter, add_model_args
from medusa.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate trained draft heads")
    what = p.add_subparsers(dest="what", required=True)
    h = what.add_parser("heads", help="per-head top-k accuracy on held-out distilled data",
                        formatter_class=HelpFormatter)
    h.add_argument("--data", required=True, help="distilled JSONL (the held-out split of `medusa train` is used)")
    h.add_argument("--heldout", type=float, default=0.02, help="must match the --heldout of training")
    h.add_argument("--all", action="store_true", help="score every record, not only the held-out split")
    h.add_argument("--topk", type=int, default=10, help="accuracy at ranks 1..K per head")
    h.add_argument("--max-batches", type=int, default=None, help="score at most this many batches (default: all)")
    h.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch")
    h.add_argument("--max-len", type=int, default=1024, help="cut sequences to this many tokens")
    h.add_argument("--json", dest="json_out", help="write the accuracies here (JSON)")
    add_model_args(h, tree=False)
    h.set_defaults(func=run)
    q = what.add_parser("quality", help="the adapted backbone of Medusa-2 heads against the original model",
                        formatter_class=HelpFormatter)
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="held-out prompts (JSONL {id, prompt} or MT-Bench questions), chat-templated")
    src.add_argument("--data", help="distilled JSONL: the prompts of its held-out split (never trained on)")
    q.add_argument("--heldout", type=float, default=0.02, help="with --data: must match the --heldout of training")
    q.add_argument("--limit", type=int, default=None, help="first N prompts only")
    q.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt, compared and scored")
    q.add_argument("--reference-dtype", default=None, help="dtype of the original model (default: --dtype)")
    q.add_argument("--max-kl", type=float, default=None, help="the bar: mean KL, nats per token (default 0.01)")
    q.add_argument("--min-identical", type=float, default=None, help="the bar: share of identical outputs (default 0.9)")
    q.add_argument("--max-ppl-ratio", type=float, default=None, help="the bar: perplexity, adapted / original (default 1.02)")
    q.add_argument("--json", dest="json_out", help="write the figures here (JSON)")
    add_model_args(q)
    q.set_defaults(func=run_quality)


def run_quality(args) -> int:
    """Exit 0 when the adapted backbone meets the bar, 1 when it misses it (2: bad input)."""
    from tqdm import tqdm

    from medusa.runtime import load_stack
    from medusa.training.quality import QualityBar, compare

    if args.new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise RequestError("--new-tokens and --limit must be >= 1")
    given = {"max_kl": args.max_kl, "min_identical": args.min_identical, "max_ppl_ratio": args.max_ppl_ratio}
    need = QualityBar(**{k: v for k, v in given.items() if v is not None})
    if not (need.max_kl >= 0 and 0 <= need.min_identical <= 1 and need.max_ppl_ratio >= 1):
        raise RequestError("the bar needs --max-kl >= 0, --min-identical in [0, 1] and --max-ppl-ratio >= 1")
    if not 0 < args.heldout < 1:
        raise RequestError(f"--heldout must be in (0, 1), got {args.heldout}")
    original = load_stack(args.model, heads="none", dtype=args.reference_dtype or args.dtype, device=args.device)
    adapted = load_stack(args.model, heads=args.heads, dtype=args.dtype, device=args.device)  # adapters merged at load
    if adapted.heads is not None and not adapted.heads.config.extra.get("adapters"):
        print(f"eval: the heads {adapted.heads_name} left the backbone as it is (no adapters)", file=sys.stderr)
    if args.data:
        from medusa.training.data import read_records, split

        prompts = [r.prompt_ids for r in split(read_records(args.data), args.heldout)[1]]
    else:
        from medusa.commands.common import read_prompts

        prompts = [original.tokenizer.encode_prompt(p.text) for p in read_prompts(args.prompt_file)]
    prompts = list({tuple(p): p for p in prompts if p}.values())[: args.limit]  # a prompt distilled twice counts once
    if not prompts:
        raise RequestError("no held-out prompts to score")
    bar = tqdm(total=len(prompts), desc="comparing", unit="prompt")
    report = compare(original.model, adapted.model, prompts, args.new_tokens, progress=bar.update)
    bar.close()
    failures = report.failures(need)
    dt = lambda m: str(m.dtype).removeprefix("torch.")  # noqa: E731
    print(f"{adapted.heads_name} ({dt(adapted.model)}) vs the original ({dt(original.model)}), {report.prompts} held-out prompts x {report.new_tokens} greedy tokens "
          f"({report.tokens} scored):\n"
          f"  mean KL(original || adapted)   {report.mean_kl:.5f} nats/token   (bar <= {need.max_kl})\n"
          f"  identical greedy outputs       {report.identical}/{report.prompts} = {report.identical_share:.3f}   "
          f"(bar >= {need.min_identical})\n"
          f"  perplexity of the original's outputs: original {report.ppl_original:.4f}, adapted {report.ppl_adapted:.4f}, "
          f"ratio {report.ppl_ratio:.4f}   (bar <= {need.max_ppl_ratio})\n"
          f"  quality {'KEPT' if not failures else 'NOT KEPT: ' + '; '.join(failures)}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"heads": adapted.heads_name, "bar": need.__dict__, "kept": not failures,
                                                   **report.to_dict()}, indent=1))
    return 0 if not failures else 1


def format_table(acc, head_type: str, scope: str = "held-out") -> str:
    k = len(acc.topk[0])
    cols = [c for c in (1, 2, 3, 5, 10) if c <= k]
    lines = [f"{head_type} heads, {acc.tokens} {scope} positions", "head  " + "  ".join(f"top-{c:<3d}" for c in cols)]
    for i, row in enumerate(acc.topk):
        lines.append(f"{i:>4d}  " + "  ".join(f"{row[c - 1]:7.3f}" for c in cols))
    return "\n".join(lines)


def run(args) -> int:
    from tqdm import tqdm

    from medusa.runtime import load_stack
    from medusa.training.accuracy import head_accuracy
    from medusa.training.data import read_records, split

    if args.topk < 1:
        raise RequestError("--topk must be >= 1")
    if args.heads in ("none", None):
        raise RequestError("--heads: give the heads to evaluate (medusa, hydra or a folder)")
    records = read_records(args.data)
    train, held = split(records, args.heldout)
    data = train + held if args.all else held
    if not data:
        raise RequestError(f"no held-out records in {args.data} (try --all or a larger --heldout)")
    stack = load_stack(args.model, heads=args.heads, dtype=args.dtype, device=args.device)
    if stack.heads is None or stack.heads_name == "untrained":
        raise RequestError(f"no trained heads for {args.heads!r}")
    bar = tqdm(desc="scoring", unit="batch")
    acc = head_accuracy(stack.heads, stack.model, data, topk=args.topk, max_tokens=args.batch_tokens, max_len=args.max_len,
                        max_batches=args.max_batches, progress=bar.update)
    bar.close()
    ht = stack.heads.config.head_type
    print(format_table(acc, ht, "scored" if args.all else "held-out"))
    tree = stack.heads.config.tree
    if tree and acc.paths is not None:
        from medusa.decoding.tree import counted_accept_length

        print(f"the heads' {len(tree) + 1}-node tree accepts {counted_accept_length(tree, acc.paths, acc.tokens):.3f} "
              f"tokens per step at these positions (greedy, teacher-forced)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"heads": stack.heads_name, "head_type": ht, **acc.to_dict()}, indent=1))
        print(f"eval: accuracies written to {args.json_out}", file=sys.stderr)
    return 0
