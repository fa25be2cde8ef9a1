"""`medusa train`: train Medusa-1, Hydra or Hydra++ heads on distilled data over the frozen
base model, new or (--init-heads) continuing from trained ones; resumable from the checkpoint
in --out; writes heads.safetensors + heads.json (and train.json: the recipe and the
evaluation history). With --joint (Medusa-2) the heads train together with LoRA adapters on the
backbone, held to the original by self-distillation (medusa.training.joint); the adapters are
saved beside the heads (adapters.safetensors, named in heads.json) and merged into the backbone
whenever the heads load."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from medusa.commands.common import HelpFormatter, add_model_args
from medusa.errors import RequestError
from medusa.heads.adapters import ADAPTERS, ATTENTION_TARGETS, MLP_TARGETS, TARGETS

HEAD_TYPES = ("medusa", "hydra", "hydra++")
TARGET_SETS = {"all": TARGETS, "attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS}


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
    j = p.add_argument_group("joint training (Medusa-2: heads + LoRA adapters on the backbone)")
    j.add_argument("--joint", action="store_true", help="train LoRA adapters on the backbone with the heads, the backbone's "
                   "loss being the KL to the original model (warm up first: --init-heads with trained heads)")
    j.add_argument("--lora-rank", type=int, default=None, help="(default: 16, or the --init-heads adapters')")
    j.add_argument("--lora-alpha", type=float, default=None, help="the adapters' scale is alpha / rank (default: 2 x rank)")
    j.add_argument("--lora-targets", default=None,
                   help=f"comma list of projections to adapt, among {','.join(TARGETS)}, or attention | mlp | all (default: all)")
    j.add_argument("--adapter-lr", type=float, default=None, help="the adapters' peak learning rate (default: --lr / 10)")
    j.add_argument("--kl-weight", type=float, default=1.0, help="weight of the backbone's KL to the original")
    j.add_argument("--heads-weight", type=float, default=0.2, help="weight of the heads' depth-weighted loss")
    j.add_argument("--adapter-start", type=int, default=0, help="steps with the adapters frozen before they train")
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


def init_folder(args) -> Path:
    """The heads folder --init-heads names."""
    from medusa.runtime import SHIPPED_HEADS, shipped_heads_dirs

    spec = args.init_heads
    if spec in ("default", *SHIPPED_HEADS):
        found = shipped_heads_dirs(spec)
        if not found:
            raise RequestError(f"--init-heads {spec}: no shipped {spec} heads in this installation")
        return found[0]
    return Path(spec)


def init_adapters(args) -> dict | None:
    """The adapters entry of the --init-heads heads.json (heads trained jointly), or None."""
    if not args.init_heads:
        return None
    try:
        return (json.loads((init_folder(args) / "heads.json").read_text()).get("extra") or {}).get("adapters")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # load_heads says what is wrong with the folder


def joint_config(args, init: dict | None):
    """The JointConfig of --joint and its flags (the --init-heads adapters' shape where they have
    one), or None without --joint; RequestError for a bad value."""
    from medusa.training.joint import JointConfig
    from medusa.training.lora import LoRAConfig

    lora_flags = {"--lora-rank": args.lora_rank, "--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets,
                  "--adapter-lr": args.adapter_lr}
    if not args.joint:
        given = [f for f, v in lora_flags.items() if v is not None]
        if given or (args.kl_weight, args.heads_weight, args.adapter_start) != (1.0, 0.2, 0):
            raise RequestError(f"{', '.join(given) or 'the joint-training weights'}: only with --joint")
        return None
    if args.lora_targets is None:
        targets = tuple(init["targets"]) if init else TARGETS
    else:
        names = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        targets = tuple(TARGET_SETS[names[0]]) if len(names) == 1 and names[0] in TARGET_SETS else tuple(names)
    rank = args.lora_rank if args.lora_rank is not None else (int(init["rank"]) if init else 16)
    alpha = args.lora_alpha if args.lora_alpha is not None else (float(init["alpha"]) if init else 2.0 * rank)
    adapter_lr = args.adapter_lr if args.adapter_lr is not None else args.lr / 10
    cfg = JointConfig(LoRAConfig(rank, alpha, targets), adapter_lr / args.lr, args.kl_weight, args.heads_weight, args.adapter_start)
    try:
        cfg.check()
    except ValueError as e:
        raise RequestError(f"--joint: {e}") from None
    if init and (rank, alpha, tuple(targets)) != (int(init["rank"]), float(init["alpha"]), tuple(init["targets"])):
        raise RequestError(f"--init-heads {args.init_heads} carries adapters of rank {init['rank']}, alpha {init['alpha']}, "
                           f"targets {','.join(init['targets'])}: leave the LoRA flags out to continue them")
    return cfg


def load_init_heads(args, model):
    """The heads named by --init-heads, checked against the base model (fingerprint) and against
    any shape option given with them. Their searched tree and accuracy table describe the old
    weights and are dropped (retrained heads get their own from `medusa eval heads` and
    `medusa tree`)."""
    import torch

    from medusa.heads.io import grow_heads, load_heads

    folder = init_folder(args)
    # heads trained jointly bring their adapters: merged into the model (heads-only training), or
    # loaded into its LoRA modules (--joint: they train on)
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
    if not args.lr > 0 or args.batch_tokens < 1 or args.max_len < 4:
        raise RequestError("--lr, --batch-tokens and --max-len must be positive (max-len >= 4)")
    init_entry = init_adapters(args)
    joint = joint_config(args, init_entry)
    records = read_records(args.data)
    train, held = split(records, args.heldout)
    if not train:
        raise RequestError(f"{args.data} holds no training records")
    if args.draft_vocab < 0:
        raise RequestError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    stack = load_stack(args.model, heads="none", dtype=args.dtype, device=args.device)
    model = stack.model
    if joint is not None:
        from medusa.training.lora import apply_lora

        try:
            apply_lora(model, joint.lora)  # before the heads load: trained adapters load into these modules
        except ValueError as e:
            raise RequestError(f"--joint: {e}") from None
    heads = load_init_heads(args, model) if args.init_heads else build_new_heads(args, model, stack.source.name)
    head_type = heads.config.head_type
    teacher = args.teacher_weight if args.teacher_weight is not None else (1.0 if head_type == "hydra++" else 0.0)
    cfg = TrainConfig(lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay, epochs=args.epochs,
                      max_steps=args.max_steps, max_tokens=args.batch_tokens, max_len=args.max_len, head_decay=args.head_decay,
                      teacher_weight=teacher, seed=args.seed, time_limit=args.time_limit, checkpoint_every=args.checkpoint_every,
                      eval_batches=args.eval_batches)
    out = Path(args.out)
    if joint is None:
        trainer = Trainer(model, heads, train, held, cfg, checkpoint_dir=out / "ckpt")
    else:
        from medusa.training.joint import JointTrainer

        trainer = JointTrainer(model, heads, train, held, cfg, joint, checkpoint_dir=out / "ckpt")
    resumed = trainer.load_checkpoint()
    n_params = sum(p.numel() for p in heads.parameters())
    n_adapter = sum(t.numel() for t in trainer.adapter_tensors().values()) if joint else 0
    print(f"train: {head_type} x{heads.config.num_heads} ({n_params / 1e6:.2f}M params)"
          + (f" + LoRA r{joint.lora.rank} on {','.join(joint.lora.targets)} ({n_adapter / 1e6:.2f}M params)" if joint else "")
          + f" on {len(train)} records "
          f"({sum(len(r.response_ids) for r in train)} response tokens), {len(held)} held out, device {model.device}"
          + (f", from the heads in {args.init_heads}" if args.init_heads else "")
          + (f", resumed at step {trainer.state.step}" if resumed else "")
          + ("" if trainer.recompute else ", logits kept for backward"), file=sys.stderr)
    bar = tqdm(total=trainer.state.total_steps, initial=trainer.state.step, desc=f"training {head_type}", unit="step")

    def on_step(m: dict) -> None:
        if bar.total != m["total_steps"]:
            bar.total = m["total_steps"]
        bar.update(1)
        kl = {"kl": f"{m['kl']:.4f}"} if "kl" in m else {}
        bar.set_postfix(loss=f"{m['loss']:.3f}", top1="/".join(f"{a:.2f}" for a in m["top1"]), lr=f"{m['lr']:.1e}", **kl)

    def on_eval(r: dict) -> None:
        tqdm.write(f"eval @ step {r['step']} (epoch {r['epoch']}): loss {r['loss']:.4f}, "
                   f"top-1 per head {', '.join(f'{a:.3f}' for a in r['top1'])}"
                   + (f"; backbone KL to the original {r['kl']:.5f}, argmax agreement {r['agree']:.4f}" if "kl" in r else ""),
                   file=sys.stderr)

    t0 = time.perf_counter()
    state = trainer.fit(on_step, on_eval)
    bar.close()
    heads.eval().requires_grad_(False)
    if args.draft_vocab:
        ids, coverage = draft_vocab_from(train, model.cfg.vocab_size, min(args.draft_vocab, model.cfg.vocab_size))
        heads.set_draft_vocab(ids, model, coverage)
        print(f"train: proposals restricted to {ids.numel()} tokens ({100 * coverage:.2f}% of the training responses)",
              file=sys.stderr)
    if joint is not None:  # the adapters beside the heads, named in heads.json
        from medusa.heads.adapters import save_adapters

        entry = save_adapters(out, trainer.adapter_tensors(), joint.lora.rank, joint.lora.alpha, joint.lora.targets,
                              heads.config.base_fingerprint)
        heads.config = dataclasses.replace(heads.config, extra={**heads.config.extra, "adapters": entry})
    elif init_entry:  # heads trained on a backbone adapted before: they keep its adapters
        import shutil

        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(init_folder(args) / init_entry.get("file", ADAPTERS), out / ADAPTERS)
    save_heads(heads.to(DTYPES[args.save_dtype]), out)
    recipe = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "train": dataclasses.asdict(cfg),
              "records": len(train), "heldout_records": len(held), "response_tokens": sum(len(r.response_ids) for r in train),
              "params": n_params, "init_heads": args.init_heads,
              "joint": None if joint is None else {**dataclasses.asdict(joint), "adapter_params": n_adapter}, "recompute_logits": trainer.recompute, "steps": state.step, "epochs_done": state.epoch, "seconds_this_run": round(time.perf_counter() - t0, 1),
              "device": str(model.device) + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
              "history": state.history}
    (out / "train.json").write_text(json.dumps(recipe, indent=1))
    print(f"train: {state.step} steps; heads saved to {out}", file=sys.stderr)
    return 0
