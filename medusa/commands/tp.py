"""`--tp N` for the commands that decode (generate, bench): check the setting, start N local
ranks (medusa.parallel.launch: GPUs 0..N-1 over NCCL, or N CPU processes over gloo with
--device cpu) and run the command's own body on each. Rank 0 runs it as without --tp; its
model carries the replica driver, so every Engine it builds runs on all ranks
(medusa.parallel.replica); the other ranks serve until rank 0 is done. Not a subcommand."""
from __future__ import annotations

from typing import Callable

from medusa.errors import RequestError

HELP = ("tensor parallelism: shard the model over N local ranks (GPUs 0..N-1; N CPU processes with "
        "--device cpu); rank 0 runs the engine, the others replay its steps")
WEEK_S = 7 * 24 * 3600.0  # a command may decode for long: the ranks' failure, not a clock, ends it


def add_tp_arg(p) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="N", help=HELP)


def check_tp(args) -> str:
    """The ranks' backend for --tp (gloo or nccl), or one clear error: N < 1, a --device naming
    one GPU, more ranks than GPUs, a size that does not split the model's heads."""
    import torch

    from medusa.model.loading import read_config, resolve
    from medusa.parallel.comm import check_world
    from medusa.parallel.shard import layout

    n, device = args.tp, getattr(args, "device", None)
    if n < 1:
        raise RequestError(f"--tp must be >= 1, got {n}")
    if device not in (None, "cpu", "cuda"):
        raise RequestError(f"--tp {n} puts rank r on GPU r: give --device cuda (or cpu), not {device}")
    gpu = device == "cuda" or (device is None and torch.cuda.is_available())
    check_world(n, "cuda" if gpu else "cpu")
    layout(read_config(resolve(args.model).hf_dir), 0, n)  # resolving first also converts a GGUF once, before the ranks
    return "nccl" if gpu else "gloo"


def run_ranks(args, body: Callable, *extra) -> int:
    """body(args, *extra, group=group) on --tp local ranks; rank 0's return value (its exit
    code). A rank's error ends the command with one line naming the rank."""
    from medusa.parallel.launch import launch

    backend = check_tp(args)
    return launch(_rank, args.tp, body, args, extra, backend=backend, timeout_s=WEEK_S, pg_timeout_s=600.0)[0]


def _rank(group, body: Callable, args, extra: tuple):
    return body(args, *extra, group=group)
