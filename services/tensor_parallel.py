"""A tensor-parallel engine replica on Ray (`tensor_parallel_size` N > 1): the Serve replica is
rank 0 and runs the Engine as any replica does; it starts N-1 worker actors in the other
bundles of its placement group (app.py asks Serve for N bundles, STRICT_PACK: one node), each
of which loads its shard and replays the engine's runner calls (medusa.parallel.replica).

Failure: a worker that dies (or raises) ends its `run` call; the replica's health check sees
that (and pings every rank with a no-op plan, which also keeps idle workers inside their
control timeout), fails, and Serve replaces the replica, its placement group and, with it,
its workers (actors die with the replica that owns them). A step in flight when a peer goes
fails its requests ("error") instead of hanging: gloo raises when a connection closes, and
every collective has a timeout.

Knows Ray's actor and placement-group API and the parallel package; nothing of Serve."""
from __future__ import annotations

import os

import ray

from medusa.parallel.comm import init_rank

NAME_PREFIX = "medusa-tp-"  # + replica id + "-" + rank: the worker actors' names
FORWARD_TIMEOUT_S = 120.0  # a forward collective waiting longer than this for a peer fails


def backend_of(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


@ray.remote(max_restarts=0, max_concurrency=2)
class Worker:
    """Rank r (> 0) of one replica. `run` holds one of its two threads for the replica's life;
    the other answers `pid` (operators, tests)."""

    def run(self, rank: int, world: int, addr: str, port: int, settings: dict) -> int:
        """Join the group, load this rank's shard and the heads, serve rank 0's plans until it
        stops them; returns how many ran (an error raises out of the call)."""
        import torch

        from medusa.parallel.replica import serve
        from medusa.runtime import load_stack
        from services.config import Settings

        s = Settings.parse(settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        group = init_rank(rank, world, addr, port, backend_of(s.device), timeout_s=FORWARD_TIMEOUT_S, gpu=0)
        stack = load_stack(s.model, heads=s.heads, tree=s.tree, dtype=s.dtype, progress=False, group=group)
        return serve(group, stack.model, stack.heads)

    def pid(self) -> int:
        return os.getpid()


class Ranks:
    """Rank 0's view of its workers: start them, join the group, watch them."""

    def __init__(self, settings: dict, s, tag: str):
        """tag: the replica's id; worker r is the named actor `medusa-tp-<tag>-<r>` (found by
        operators and tests with ray.util.list_named_actors)."""
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from medusa.ports import free_port

        world = s.tensor_parallel_size
        pg = get_current_placement_group()
        if pg is None:
            raise RuntimeError("a tensor-parallel replica runs in a placement group (app.engine_deployment)")
        addr, port = ray.util.get_node_ip_address(), free_port()
        opts = {"num_cpus": s.engine_num_cpus, "num_gpus": s.engine_num_gpus}

        def in_bundle(r: int):  # worker r takes bundle r (the replica itself holds bundle 0)
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)

        self.workers = [Worker.options(name=f"{NAME_PREFIX}{tag}-{r}", scheduling_strategy=in_bundle(r), **opts).remote()
                        for r in range(1, world)]
        self.runs = [w.run.remote(r, world, addr, port, settings) for r, w in enumerate(self.workers, 1)]
        # joins once every worker has (init_process_group waits for all ranks)
        self.group = init_rank(0, world, addr, port, backend_of(s.device), timeout_s=FORWARD_TIMEOUT_S,
                               gpu=0 if backend_of(s.device) == "nccl" else None)

    def ended(self) -> str | None:
        """Why a worker is gone (its run returned or raised), or None while all run."""
        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not done:
            return None
        r = self.runs.index(done[0]) + 1
        try:
            ray.get(done[0])
            return f"tensor-parallel worker rank {r} stopped"
        except Exception as e:  # noqa: BLE001  (its death or its error: either way the replica is broken)
            return f"tensor-parallel worker rank {r} failed: {type(e).__name__}"
