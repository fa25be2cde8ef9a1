"""`medusa eval heads`: per-head top-1 .. top-k accuracy on held-out distilled data (Hydra
heads under teacher forcing), as a table and JSON (the input of `medusa tree`)."""
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
