"""A tensor-parallel engine replica: the one Engine (medusa.decoding.engine) on rank 0, its
runner's calls replayed on every rank.

Every rank loads its shard of the model and the same heads; rank 0's model carries a `Driver`
(`with replica(group, model, heads)`), and the other ranks `serve`. Each Engine built on rank 0
hands itself to the driver, which has every other rank build the same Engine (same arguments,
so the same row tensors, trees, buckets and staging buffers, each rank's KV cache holding its
KV heads). Rank 0 drives it as usual: scheduler, policy, stop rules, timing-based choices (the
adaptive policy, admission waiting for company) are rank 0's alone. The engine reaches the
replica's device state only through its runner (runner.py: `Runner.REPLAYED` names those
methods), so rank 0's runner is wrapped in a `LockstepRunner`: each such call is first
broadcast as a `StepPlan` (the engine, the method's name and its host-side arguments), then
run on rank 0's own arguments. The other ranks rebuild the arguments on their device and
make the same call on their own runner (`Replay`). So every rank runs the
same steps, prefills, row swaps, lookup drafts, catch-ups, warm-up captures and timings in the
same order, and their collectives pair up. Results (tokens) are rank 0's own: the LM head
gathers the logits on every rank, so all ranks agree anyway.

What a plan carries: ints and token lists as they are, a tree as its name in the engine's
table (the whole tree otherwise), a BatchSampling as its rows' SamplingParams (or "the same as
the last one" while the engine's batch is unchanged), and the one tensor argument, the
sampled rows' uniforms, as a CPU copy (for greedy steps nothing leaves the device).
On a GPU each rank captures its own graphs (NCCL's all-reduce is capturable); on a CPU the
same calls run eagerly over gloo.

Also here: the model the engine and heads see on a rank (`StepModel`: Hydra heads index the
whole embedding table by token id)."""
from __future__ import annotations

import itertools
import threading
import weakref
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from medusa.decoding.runner import Runner
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.dynamic_tree import DynamicTree
from medusa.decoding.tree import Tree
from medusa.parallel.comm import Group, ParallelError
from medusa.parallel.load import full_embedding
from medusa.parallel.lockstep import Lockstep, StepPlan


class StepModel:
    """A sharded model as the engine and the heads see it: calls and attributes go to the model,
    except `embed_tokens.weight`, which Hydra heads index by token id: the whole table there
    (gathered once, replicated), the model's own vocabulary shard otherwise."""

    def __init__(self, model, embedding: torch.Tensor | None = None):
        self.model = model
        self.embed_tokens = SimpleNamespace(weight=embedding) if embedding is not None else model.embed_tokens

    def __call__(self, *args, **kw):
        return self.model(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def step_model(model, heads):
    """The model `heads` need: a StepModel holding the whole embedding where Hydra heads run on a
    sharded model (a collective: every rank calls it), else the model itself."""
    from medusa.heads.hydra import HydraHeads

    if isinstance(heads, HydraHeads) and getattr(model, "tp_group", None) is not None and model.tp_group.world > 1:
        return StepModel(model, full_embedding(model))
    return model


# ------------------------------------------------------------------ plan arguments

class _TreeRef(NamedTuple):
    name: str  # a tree of the engine's table


class _Tensor(NamedTuple):
    value: torch.Tensor  # a CPU copy; rebuilt on the rank's device


class _Sampling(NamedTuple):
    params: tuple  # the rows' SamplingParams; the rank stacks its own BatchSampling


class _SameSampling(NamedTuple):
    pass  # the BatchSampling of the previous plan that carried one


class _Codec:
    """Host-side form of runner arguments (rank 0) and back (every other rank). Both sides see
    the same sequence of calls, so "the same sampling as last time" means the same on each."""

    def __init__(self, trees: dict[str, Tree], device: torch.device):
        self.trees, self.device = trees, device
        self.last: BatchSampling | None = None  # kept alive: its identity is compared

    def encode(self, x: Any) -> Any:
        if isinstance(x, (Tree, DynamicTree)):
            return _TreeRef(x.name) if self.trees.get(x.name) is x else x.to("cpu")
        if isinstance(x, BatchSampling):
            if x is self.last:
                return _SameSampling()
            self.last = x
            if x.params:
                return _Sampling(x.params)
            return BatchSampling(*(_Tensor(getattr(x, k).cpu()) for k in _SAMPLING_FIELDS), x.any_random, x.any_typical)
        if isinstance(x, torch.Tensor):
            return _Tensor(x.detach().cpu())
        if type(x) in (list, tuple):
            return type(x)(self.encode(v) for v in x)
        if type(x) is dict:
            return {k: self.encode(v) for k, v in x.items()}
        return x

    def decode(self, x: Any) -> Any:
        if isinstance(x, _TreeRef):
            return self.trees[x.name]
        if isinstance(x, (Tree, DynamicTree)):
            return x.to(self.device)
        if isinstance(x, _SameSampling):
            return self.last
        if isinstance(x, _Sampling):
            self.last = BatchSampling.stack(list(x.params), self.device)
            return self.last
        if isinstance(x, BatchSampling):
            self.last = BatchSampling(*(self.decode(getattr(x, k)) for k in _SAMPLING_FIELDS), x.any_random,
                                      x.any_typical)
            return self.last
        if isinstance(x, _Tensor):
            return x.value.to(self.device)
        if type(x) in (list, tuple):
            return type(x)(self.decode(v) for v in x)
        if type(x) is dict:
            return {k: self.decode(v) for k, v in x.items()}
        return x


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "typical", "threshold", "alpha")


# ------------------------------------------------------------------ the two sides

class Driver:
    """Rank 0 of a replica: set as `model.replica` on rank 0's model, so that every Engine built
    over it (Engine.__init__ calls `adopt`) is built on every rank too and its runner replays
    there. Several engines may live at once (each plan names its engine); one that rank 0 drops
    is dropped on the other ranks with the next plan."""

    def __init__(self, group: Group, heads=None):
        self.group, self.heads = group, heads
        self.lock = Lockstep(group, None)
        self._mu = threading.RLock()  # one plan and its local call at a time, whichever thread calls
        self._ids = itertools.count()
        self._dropped: list[int] = []  # engines rank 0 no longer holds (appended by their finalizers)
        self.stopped = False

    def adopt(self, engine, spec: dict) -> None:
        """Build `engine` (Engine(model, heads, **spec)) on every rank; route its runner through here."""
        if engine.heads is not None and engine.heads is not self.heads:
            raise ParallelError("a tensor-parallel replica runs the draft heads it was loaded with")
        with self._mu:
            eid = next(self._ids)
            self.send("engine", {"engine": eid, "heads": engine.heads is not None,
                                 "spec": _Codec({}, engine.device).encode(spec)})
        engine.runner = LockstepRunner(engine.runner, engine.trees, self, eid)
        weakref.finalize(engine, self._dropped.append, eid)

    def send(self, op: str, args: dict) -> None:
        if self.stopped:
            raise ParallelError("this tensor-parallel replica's other ranks were released")
        if self.group.world > 1:
            args["drop"], self._dropped = self._dropped, []
            self.lock.send(StepPlan(op, args))

    def ping(self) -> None:
        """A no-op plan: proves every rank still takes plans (a dead one fails the broadcast) and
        keeps idle workers inside their control timeout (comm.init_rank)."""
        with self._mu:
            self.send("ping", {})

    def stop(self) -> None:
        """Release the other ranks (their `serve` returns); idempotent."""
        with self._mu:
            if not self.stopped and self.group.world > 1:
                self.lock.stop()
            self.stopped = True


class LockstepRunner:
    """Rank 0's runner: the engine's Runner, whose device calls (Runner.REPLAYED) are broadcast
    to the other ranks before they run here. Everything else (shapes, costs, counters) is read
    from the runner itself."""

    def __init__(self, runner: Runner, trees: dict[str, Tree], driver: Driver, eid: int):
        self._runner, self._driver, self._eid = runner, driver, eid
        self._codec = _Codec(trees, runner.rows.start.device)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._runner, name)
        if name in Runner.REPLAYED:
            return lambda *args, **kw: self._call(name, attr, args, kw)
        return attr

    def _call(self, op: str, fn, args: tuple, kw: dict) -> Any:
        with self._driver._mu:
            if self._driver.group.world > 1:
                self._driver.send(op, {"engine": self._eid, "args": self._codec.encode(args),
                                       "kw": self._codec.encode(kw)})
            return fn(*args, **kw)


class Replay:
    """A worker's executor for one engine: each plan's call on the engine's own runner."""

    def __init__(self, runner: Runner, trees: dict[str, Tree]):
        self.runner = runner
        self.codec = _Codec(trees, runner.rows.start.device)

    def __call__(self, plan: StepPlan) -> Any:
        if plan.op not in Runner.REPLAYED:
            raise ParallelError(f"unknown step plan {plan.op!r}")
        args, kw = self.codec.decode(plan.args["args"]), self.codec.decode(plan.args["kw"])
        return getattr(self.runner, plan.op)(*args, **kw)


def serve(group: Group, model, heads=None) -> int:
    """A worker rank (not 0) of a replica: build each engine rank 0 builds (over this rank's
    shard `model` and replicated `heads`, loaded as rank 0 loaded its own) and replay its runner
    calls, until rank 0's Driver stops. Returns the plans run; a failing one raises."""
    from medusa.decoding.engine import Engine

    engines: dict[int, Replay] = {}

    def execute(plan: StepPlan) -> Any:
        with torch.inference_mode():
            for eid in plan.args.get("drop", ()):
                engines.pop(eid, None)
            if plan.op == "ping":
                return None
            if plan.op == "engine":
                spec = _Codec({}, model.device).decode(plan.args["spec"])
                eng = Engine(model, heads if plan.args["heads"] else None, **spec)
                engines[plan.args["engine"]] = Replay(eng.runner, eng.trees)
                return None
            return engines[plan.args["engine"]](plan)

    return Lockstep(group, execute).serve()


def drive(group: Group, model, heads=None) -> Driver:
    """Rank 0 of a long-lived replica (a serving deployment): engines built over `model` from
    now on are replicas; `Driver.stop()` releases the other ranks (they `serve`)."""
    driver = Driver(group, heads)
    model.replica = driver
    return driver


@contextmanager
def replica(group: Group, model, heads=None):
    """Around one command's work on every rank of `group`. Rank 0 gets True: its `model` now
    carries a Driver (engines built over it are replicas), released when the block ends.
    The other ranks serve inside the `with` and get False: they skip the block's work."""
    if group.rank != 0:
        serve(group, model, heads)
        yield False
        return
    driver = drive(group, model, heads)
    try:
        yield True
    finally:
        driver.stop()
        model.replica = None
