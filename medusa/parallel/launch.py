"""Start N local ranks and collect what each returns, failing loudly instead of hanging.

`launch(fn, world, *args)` spawns `world` processes (spawn, not fork: CUDA and threads), joins
them into one group (gloo on a CPU, NCCL with one GPU per rank) and runs fn(group, *args) on
each; it returns their results in rank order. NVLink multicast is forced off in the parent's
environment before the ranks start (they inherit it) and again in each rank (comm.init_rank).

Failure is bounded: the parent watches every rank while it waits, and when one raises, exits
or is killed before returning, it ends the others and raises ParallelError naming the rank;
so does a group that outlives `timeout_s`. Inside the group, a peer's death also surfaces as an
error in the next collective (gloo: the connection closes; NCCL: the group's timeout).

Does not know about models or plans (fn does)."""
from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from medusa.parallel.comm import ParallelError, check_world, disable_multicast, init_rank, leave
from medusa.ports import free_port


def _rank_main(rank: int, world: int, port: int, backend: str, pg_timeout_s: float, threads: int,
               fn: Callable, args: tuple, results) -> None:
    try:
        if backend == "gloo":
            torch.set_num_threads(threads)
        group = init_rank(rank, world, "127.0.0.1", port, backend, timeout_s=pg_timeout_s)
        out = fn(group, *args)
        # pickled by value here: torch's queue would share tensors through memory the exiting rank frees
        results.put((rank, True, pickle.dumps(out)))
    except BaseException as e:  # noqa: BLE001  (reported to the parent, then this rank exits non-zero)
        last = traceback.format_exc().strip().splitlines()[-1]
        results.put((rank, False, f"{type(e).__name__}: {e}" if str(e) else last))
        results.close()
        results.join_thread()
        os._exit(1)
    finally:
        leave()


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def launch(fn: Callable, world: int, *args, backend: str | None = None, timeout_s: float = 600.0,
           pg_timeout_s: float = 60.0, threads: int = 1) -> list[Any]:
    """Run fn(group, *args) on `world` local ranks; their return values by rank (picklable).
    backend: 'gloo' (CPU ranks) or 'nccl' (rank r on GPU r); default nccl where GPUs exist.
    threads: torch CPU threads per gloo rank. Raises ParallelError for a size this machine
    cannot host, a rank that fails or dies, or a group still running after timeout_s."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    check_world(world, "cuda" if backend == "nccl" else "cpu")
    disable_multicast()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, backend, pg_timeout_s, threads, fn, args, results),
                         name=f"tp-rank-{r}", daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    gone_since: dict[int, float] = {}
    try:
        while len(got) < world:
            try:
                rank, ok, out = results.get(timeout=0.2)
            except queue.Empty:
                rank = None
            if rank is not None:
                if not ok:
                    raise ParallelError(f"tensor-parallel rank {rank} of {world} failed: {out}")
                got[rank] = pickle.loads(out)
                continue
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r in got or p.is_alive():
                    continue
                if p.exitcode != 0:
                    raise ParallelError(f"tensor-parallel rank {r} of {world} died (exit code {p.exitcode})")
                # exited cleanly: its result may still be in the pipe; give it a moment
                if now - gone_since.setdefault(r, now) > 5.0:
                    raise ParallelError(f"tensor-parallel rank {r} of {world} exited without a result")
            if now > deadline:
                raise ParallelError(f"tensor-parallel group of {world} ranks still running after {timeout_s:.0f} s")
    finally:
        if len(got) < world:
            _stop(procs)
        else:
            for p in procs:
                p.join(10.0)
            _stop(procs)
    return [got[r] for r in range(world)]
