"""One rank's view of its tensor-parallel group and the collectives a sharded forward needs:
all-reduce (after the row-parallel o/down projections and the vocabulary-parallel embedding),
all-gather (the LM head's logits, where a caller needs all of them) and an object broadcast
(the lockstep step plans).

Backends: gloo on a CPU, NCCL on GPUs. On GPUs the step plans travel over a second, gloo group
(host objects; NCCL would stage them through device memory and sync), so the two planes never
wait on each other. Every group has a timeout, so a collective whose peer is gone raises
instead of waiting forever (gloo also raises at once when a peer's connection closes).

NVLink multicast (NVLS) stays off: `disable_multicast` forces the settings into the
environment of every rank, whoever starts it (`launch`, or a serving actor calling
`init_rank`), so no deployment turns it on by accident.

Does not know about models, weights or plans."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from medusa.errors import MedusaError

# NCCL's NVLink SHARP, torch's symmetric-memory multicast and NVSHMEM's NVLS: off on every rank
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class ParallelError(MedusaError):
    """A tensor-parallel setting that cannot work (sizes, devices), or a rank that failed."""


def disable_multicast(env: dict | None = None) -> None:
    """Force NVLink multicast off in `env` (default: this process's environment, which the
    ranks it starts inherit). Set, not defaulted: an inherited '1' must not win."""
    env = os.environ if env is None else env
    env.update(NO_MULTICAST)


def check_world(world: int, device_type: str) -> None:
    """Refuse a group size this machine cannot host: < 1, or more GPU ranks than GPUs."""
    if world < 1:
        raise ParallelError(f"tensor parallel size must be >= 1, got {world}")
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if world > n:
            raise ParallelError(f"tensor parallel size {world} needs {world} GPU{'s' * (world > 1)}; this machine has {n}")


@dataclass
class Group:
    """This rank's place in the group. pg: the process group of the forward's collectives;
    control: the gloo group of the step plans (pg itself on a CPU). World 1 has neither, and
    every collective is the identity."""

    rank: int
    world: int
    device: torch.device
    pg: Any = None
    control: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the forward's partial sums)."""
        if self.world > 1:
            dist.all_reduce(x, group=self.pg)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x (same shape on each), concatenated along `dim` in rank order."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.pg)
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's obj on every rank (pickled over the control group)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def single(device: str | torch.device = "cpu") -> Group:
    """The group of one rank (no process group): the unsharded path through the same code."""
    return Group(0, 1, torch.device(device))


def init_rank(rank: int, world: int, addr: str, port: int, backend: str = "gloo",
              timeout_s: float = 60.0, control_timeout_s: float = 3600.0, gpu: int | None = None) -> Group:
    """Join the group of `world` ranks at tcp://addr:port. backend 'nccl' puts rank r on GPU r
    of those visible, or on GPU `gpu` (a process that sees only its own GPU, as a Ray actor
    does: 0). timeout_s bounds every forward collective; control_timeout_s bounds how long a
    worker waits for the next step plan (an idle replica's driver must send a plan, even a
    no-op, within it)."""
    if backend not in ("gloo", "nccl"):
        raise ParallelError(f"backend must be gloo or nccl, got {backend!r}")
    disable_multicast()
    if gpu is None:
        check_world(world, "cuda" if backend == "nccl" else "cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank if gpu is None else gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    pg = dist.group.WORLD
    # plans: a gloo group (host objects) with its own, longer timeout (workers idle between requests)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))
    return Group(rank, world, device, pg, control)


def leave() -> None:
    """Tear this rank's process groups down (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()
