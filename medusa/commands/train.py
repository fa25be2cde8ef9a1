"""`medusa train`: train Medusa-1, Hydra or Hydra++ heads on distilled data over the frozen
base model, new or (--init-heads) continuing from trained ones; resumable from the checkpoint
in --out; writes heads.safetensors + heads.json (and train.json: the recipe and the
evaluation history)."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from medusa.commands.common import HelpFormatter, add_model_args
from medusa.errors import RequestError

HEAD_TYPES = ("medusa", "hydra", "hydra++")


def register(sub) -> None:
    p = sub.add_parser("train", help="train draft heads on distilled data (frozen base model)",
                       formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="distilled JSONL (medusa distill)")
    p.add_argument("--out", required=True, help="output folder (heads + checkpoint; rerun to resume)")
    p.add_argument("--init-heads", metavar="DIR",
                   help="start from these trained heads (a heads folder, or default | medusa | hydra for the shipped ones); "
                        "their shape is kept, except that a larger --num-layers or --prefix-intermediate grows them "
                        "(new blocks start as the identity, so the grown heads first compute what the old ones did)")
    p.add_argument("--head-type", choices=HEAD_TYPES, default=None, help="(default: medusa)")
    p.add_argument("--num-heads", type=int, default=None, help="(default: 4)")
    p.add_argument("--num-layers", type=int, default=None, help="residual blocks per head, Hydra: MLP depth (default: 1)")
    p.add_argument("--prefix-intermediate", type=int, default=None, help="Hydra++ prefix layer MLP width (default: the base's)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training records")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: the epochs' steps)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch")
    p.add_argument("--max-len", type=int, default=1024, help="cut sequences to this many tokens")
    p.add_argument("--head-decay", type=float, default=0.8, help="loss weight of head i is DECAY**i")
    p.add_argument("--teacher-weight", type=float, default=None,
                   help="0 = CE on distilled tokens, 1 = soft CE vs the base distribution (default: 1 for hydra++, else 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--heldout", type=float, default=0.02, help="share of records held out for evaluation")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; the schedule is fitted to it")
    p.add_argument("--checkpoint-every", type=int, default=200, help="save the heads every N steps")
    p.add_argument("--eval-batches", type=int, default=40, help="held-out batches per evaluation (0: all)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="restrict the saved heads' proposals to the N tokens most frequent in the training responses "
                        "(0: the whole vocabulary; `medusa vocab` sets it later)")
    p.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="dtype of the saved head weights")
    p.add_argument("--seed", type=int, default=0, help="random seed of the run")
    add_model_args(p, heads=False)
    p.set_defaults(func=run)


def build_new_heads(args, model, source_name: str):
    from medusa.heads.base import HeadsConfig
    from medusa.heads.hydra import prefix_extra
    from medusa.heads.io import build_heads, fingerprint

    head_type = args.head_type or "medusa"
    num_heads = 4 if args.num_heads is None else args.num_heads
    num_layers = 1 if args.num_layers is None else args.num_layers
    if num_heads < 1 or num_layers < 1:
        raise RequestError("--num-heads and --num-layers must be >= 1")
    extra = prefix_extra(model, args.prefix_intermediate) if head_type == "hydra++" else {}
    cfg = HeadsConfig(head_type, num_heads, num_layers, model.cfg.hidden_size, model.cfg.vocab_size,
                      fingerprint(model), source_name, extra=extra)
    import torch

    torch.manual_seed(args.seed)
    return build_heads(cfg, model)


def load_init_heads(args, model):
    """The heads named by --init-heads, checked against the base model (fingerprint) and against
    any shape option given with them. Their searched tree and accuracy table describe the old
    weights and are dropped (retrained heads get their own from `medusa eval heads` and
    `medusa tree`)."""
    import torch

    from medusa.heads.io import grow_heads, load_heads
    from medusa.runtime import SHIPPED_HEADS, shipped_heads_dirs

    spec = args.init_heads
    if spec in ("default", *SHIPPED_HEADS):
        found = shipped_heads_dirs(spec)
        if not found:
            raise RequestError(f"--init-heads {spec}: no shipped {spec} heads in this installation")
        folder = found[0]
    else:
        folder = Path(spec)
    heads = load_heads(folder, model, dtype=torch.float32)  # checks the files and the base model's fingerprint
    c = heads.config
    given = {"--head-type": (args.head_type, c.head_type), "--num-heads": (args.num_heads, c.num_heads)}
    for flag, (want, have) in given.items():
        if want is not None and want != have:
            raise RequestError(f"{flag} {want} does not match the heads in {folder} ({have}); "
                               f"leave it out to continue training them as they are")
    try:  # larger --num-layers / --prefix-intermediate grow the heads, computing the same at first
        heads = grow_heads(heads, model, args.num_layers, args.prefix_intermediate)
    except ValueError as e:
        raise RequestError(f"--init-heads {folder}: {e}") from None
    c = heads.config
    stale = ("tree_expected_accept_length", "tree_counted_accept_length", "rank_accuracy")
    heads.config = dataclasses.replace(c, tree=None, extra={k: v for k, v in c.extra.items() if k not in stale})
    heads.set_draft_vocab(None, model)  # chosen again from this run's data (--draft-vocab)
    return heads


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from medusa.heads.io import save_heads
    from medusa.runtime import DTYPES, load_stack
    from medusa.training.data import draft_vocab_from, read_records, split
    from medusa.training.trainer import TrainConfig, Trainer

    if args.teacher_weight is not None and not 0.0 <= args.teacher_weight <= 1.0:
        raise RequestError(f"--teacher-weight must be in [0, 1], got {args.teacher_weight}")
    if args.lr <= 0 or args.batch_tokens < 1 or args.max_len < 4:
        raise RequestError("--lr, --batch-tokens and --max-len must be positive (max-len >= 4)")
    records = read_records(args.data)
    train, held = split(records, args.heldout)
    if not train:
        raise RequestError(f"{args.data} holds no training records")
    if args.draft_vocab < 0:
        raise RequestError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    stack = load_stack(args.model, heads="none", dtype=args.dtype, device=args.device)
    model = stack.model
    heads = load_init_heads(args, model) if args.init_heads else build_new_heads(args, model, stack.source.name)
    head_type = heads.config.head_type
    teacher = args.teacher_weight if args.teacher_weight is not None else (1.0 if head_type == "hydra++" else 0.0)
    cfg = TrainConfig(lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay, epochs=args.epochs,
                      max_steps=args.max_steps, max_tokens=args.batch_tokens, max_len=args.max_len, head_decay=args.head_decay,
                      teacher_weight=teacher, seed=args.seed, time_limit=args.time_limit, checkpoint_every=args.checkpoint_every,
                      eval_batches=args.eval_batches)
    out = Path(args.out)
    trainer = Trainer(model, heads, train, held, cfg, checkpoint_dir=out / "ckpt")
    resumed = trainer.load_checkpoint()
    n_params = sum(p.numel() for p in heads.parameters())
    print(f"train: {head_type} x{heads.config.num_heads} ({n_params / 1e6:.2f}M params) on {len(train)} records "
          f"({sum(len(r.response_ids) for r in train)} response tokens), {len(held)} held out, device {model.device}"
          + (f", from the heads in {args.init_heads}" if args.init_heads else "")
          + (f", resumed at step {trainer.state.step}" if resumed else "")
          + ("" if trainer.recompute else ", logits kept for backward"), file=sys.stderr)
    bar = tqdm(total=trainer.state.total_steps, initial=trainer.state.step, desc=f"training {head_type}", unit="step")

    def on_step(m: dict) -> None:
        if bar.total != m["total_steps"]:
            bar.total = m["total_steps"]
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", top1="/".join(f"{a:.2f}" for a in m["top1"]), lr=f"{m['lr']:.1e}")

    def on_eval(r: dict) -> None:
        tqdm.write(f"eval @ step {r['step']} (epoch {r['epoch']}): loss {r['loss']:.4f}, "
                   f"top-1 per head {', '.join(f'{a:.3f}' for a in r['top1'])}", file=sys.stderr)

    t0 = time.perf_counter()
    state = trainer.fit(on_step, on_eval)
    bar.close()
    heads.eval().requires_grad_(False)
    if args.draft_vocab:
        ids, coverage = draft_vocab_from(train, model.cfg.vocab_size, min(args.draft_vocab, model.cfg.vocab_size))
        heads.set_draft_vocab(ids, model, coverage)
        print(f"train: proposals restricted to {ids.numel()} tokens ({100 * coverage:.2f}% of the training responses)",
              file=sys.stderr)
    save_heads(heads.to(DTYPES[args.save_dtype]), out)
    recipe = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "train": dataclasses.asdict(cfg),
              "records": len(train), "heldout_records": len(held), "response_tokens": sum(len(r.response_ids) for r in train),
              "params": n_params, "init_heads": args.init_heads, "recompute_logits": trainer.recompute, "steps": state.step, "epochs_done": state.epoch, "seconds_this_run": round(time.perf_counter() - t0, 1),
              "device": str(model.device) + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
              "history": state.history}
    (out / "train.json").write_text(json.dumps(recipe, indent=1))
    print(f"train: {state.step} steps; heads saved to {out}", file=sys.stderr)
    return 0
