"""Lockstep ranks: rank 0 decides, every rank runs the same call on its shard.

Rank 0 (the engine's runner, wrapped by replica.Driver) turns each call into a `StepPlan`, a
small picklable description of what to run with which host-side inputs (token ids, a tree name,
lookup drafts, sampling settings and uniforms, row swaps), and `Lockstep.run` broadcasts it
before executing it locally (`send` only broadcasts, for a caller that runs the call itself).
Workers sit in `Lockstep.serve`, receiving plans and running the same executor on them (there:
replica.serve, which replays each on the rank's own runner). Collectives pair up across ranks
because every rank runs the same calls in the same order. Rank 0's result is the one that
counts; workers' results are dropped.

Draft heads: replicated on every rank, not run on rank 0 and broadcast. Why:
- the heads read the all-reduced hidden state, which every rank already holds bitwise equal,
  so every rank proposes the same candidates without any communication; rank 0 plus a
  broadcast would add a collective (and a host round trip when the candidates leave the
  captured graph) to every step, on the latency-critical path of a memory-bound step;
- the step stays one function (medusa.decoding.step) on every rank: heads, verification and
  the KV commit run unchanged, and on GPUs the whole step, collectives included, can be one
  CUDA graph per rank;
- their cost is small: the heads are a few residual blocks (Hydra++: one decoder layer) that
  share the base's LM head, which is vocabulary-parallel (the heads' logits are gathered like
  the base's) unless they bring a draft vocabulary, whose F rows are replicated. Hydra heads
  index the embedding table by token id, so a rank keeps the whole table once more for them
  (replica.StepModel): V x D, e.g. 0.26 GB for a 7B Llama in bfloat16, 2.1 GB for Llama-3 70B.
Verification reads the gathered logits of every tree node, so greedy, typical and lossless
sampling are the single-device rules, exact; random draws use the uniforms of each request's
seeded stream on rank 0 (the engine's own), which the plan carries to the other ranks, so a
seed gives the tokens of one device.

A rank that dies fails the group loudly: gloo raises in the peers' next collective when the
connection closes, every collective has a timeout, and the launcher (launch.py) ends the other
ranks when one exits. Does not know about models, trees or requests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from medusa.parallel.comm import Group

STOP = "stop"  # the plan that ends a worker's loop


@dataclass(frozen=True)
class StepPlan:
    """What every rank runs next: an operation name and its host-side inputs (plain Python
    values and small CPU tensors; pickled once per step)."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)


class Lockstep:
    """Broadcast plans from rank 0; run `execute(plan)` on every rank."""

    def __init__(self, group: Group, execute: Callable[[StepPlan], Any]):
        self.group, self.execute = group, execute
        self.steps = 0

    def run(self, plan: StepPlan) -> Any:
        """Rank 0: send `plan` to every worker, run it here, return its result."""
        self.send(plan)
        return self.execute(plan)

    def send(self, plan: StepPlan) -> None:
        """Rank 0: send `plan` to every worker without running it here (a caller that makes the
        same call itself, on its own arguments: replica.LockstepRunner)."""
        if self.group.rank != 0:
            raise RuntimeError("only rank 0 drives the lockstep; workers call serve()")
        self.group.broadcast_object(plan)
        self.steps += 1

    def serve(self) -> int:
        """A worker: run plans until rank 0 sends STOP; returns how many ran. A failing plan
        raises out of here (and out of the rank), which fails the whole group."""
        if self.group.rank == 0:
            raise RuntimeError("rank 0 drives the lockstep with run(); serve() is for workers")
        while True:
            plan = self.group.broadcast_object()
            if plan.op == STOP:
                return self.steps
            self.execute(plan)
            self.steps += 1

    def stop(self) -> None:
        """Rank 0: release the workers from serve()."""
        self.group.broadcast_object(StepPlan(STOP))
