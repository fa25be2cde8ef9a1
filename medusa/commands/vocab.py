"""`medusa vocab`: restrict a heads folder's proposals to the tokens most frequent in distilled
responses (a draft vocabulary). Each head's LM-head GEMM and top-k then run over those rows
only; verification still scores the whole vocabulary, so output is unchanged. Writes the ids
into the folder's heads.safetensors and the size into heads.json (the weights are untouched)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from medusa.commands.common import HelpFormatter
from medusa.errors import RequestError


def register(sub) -> None:
    p = sub.add_parser("vocab", help="restrict draft heads to the most frequent tokens of distilled data",
                       formatter_class=HelpFormatter)
    p.add_argument("--heads", required=True, help="heads folder to update in place")
    p.add_argument("--data", help="distilled JSONL (medusa distill); the training split is counted")
    p.add_argument("--size", type=int, required=True, help="tokens to keep (0: remove the draft vocabulary)")
    p.add_argument("--heldout", type=float, default=0.02, help="must match the --heldout of training")
    p.set_defaults(func=run)


def run(args) -> int:
    from medusa.heads.io import CONFIG, write_draft_vocab
    from medusa.training.data import draft_vocab_from, read_records, split

    folder = Path(args.heads)
    if not (folder / CONFIG).is_file():
        raise RequestError(f"--heads {folder}: not a heads folder (no {CONFIG})")
    if args.size < 0:
        raise RequestError(f"--size must be >= 0, got {args.size}")
    if args.size == 0:
        write_draft_vocab(folder, None)
        print(f"vocab: {folder} proposes from the whole vocabulary", file=sys.stderr)
        return 0
    if not args.data:
        raise RequestError("--data is needed to choose a draft vocabulary")
    vocab_size = int(json.loads((folder / CONFIG).read_text()).get("vocab_size", 0))
    train, _ = split(read_records(args.data), args.heldout)
    if not train:
        raise RequestError(f"{args.data} holds no training records")
    ids, coverage = draft_vocab_from(train, vocab_size, args.size)
    write_draft_vocab(folder, ids, coverage)
    print(f"vocab: {folder} proposes from {ids.numel()} of {vocab_size} tokens, "
          f"{100 * coverage:.2f}% of the {sum(len(r.response_ids) for r in train)} response tokens counted", file=sys.stderr)
    return 0
