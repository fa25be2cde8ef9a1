"""Engine warm-up: prepare for traffic before the first request. On a GPU, capture the step
graphs (batch bucket x tree x KV bucket) and the prefill graphs (rows x prompt bucket, timing
their replays for the prefill split); with draft heads, time one step of each batch bucket x
tree on idle rows and seed the policy's cost model with it, so that no request's step is spent
finding a cost out. A CPU needs no graphs; callers there may skip the timing and let the
policy measure each cost when it first needs it.

A mixin of Engine (core.py); all the work runs through the engine's runner."""
from __future__ import annotations

import time

import torch

from medusa.decoding.runner import Runner
from medusa.errors import RequestError


class Warmup:
    def warmup(self, max_kv_len: int | None = None, trees: list[str] | None = None, progress=None,
               measure: bool = True) -> int:
        """Prepare for traffic; call it before the first request (it waits for running rows).
        1. With CUDA graphs: capture the greedy step of every batch bucket x tree (default: all
           the engine's trees) x KV bucket up to max_kv_len (default: max_seq_len), and the
           prefill of every (rows, prompt length) bucket up to max_kv_len (timing its replay, for
           the split of admitted prompts into forwards), so that no request waits for a capture
           (sampled steps are captured on first use).
        2. measure (with draft heads): time one step of each batch bucket x tree on idle rows and
           give the times to the adaptive policy, which then never spends a request's step on
           finding a cost out. Per bucket, trees are timed smallest first; one that could not
           beat plain decoding even at the time of the last smaller tree is skipped.
        progress(done, total), if given, is called as work is done. Returns the graphs captured."""
        names = list(trees or self.trees)
        for n in names:
            if n not in self.trees:
                raise RequestError(f"unknown tree {n!r}: the engine has {', '.join(self.trees)}")
        limit = min(max_kv_len or self.max_seq_len, self.max_seq_len)
        timer = self.runner
        todo = []  # captures, each a call returning whether it captured a graph
        if timer.capture:
            for n in names:
                tree = self.trees[n]
                kvs = sorted({timer.kv_len(k, tree.num_nodes) for k in [*range(0, limit, 64), limit]})
                todo += [lambda t=tree, b=b, kv=kv: timer.prepare_step(t, b, kv, self._idle_lengths(b))
                         for b in timer.buckets for kv in kvs]
            todo += [lambda R=R, Tb=Tb: timer.prepare_prefill(R, Tb, measure=True)
                     for R, Tb in timer.stage.shapes(limit)]
        timed = sorted({"ar", *names}, key=lambda n: self.trees[n].num_nodes)
        if not measure or self.heads is None or len(timed) < 2:
            timed = []
        total = len(todo) + len(timer.buckets) * len(timed)
        while True:
            with self._step_lock, torch.inference_mode():
                if self.pool.n_active == 0:  # idle rows only; nothing is admitted while the lock is held
                    return self._prepare(timer, todo, timed, limit, total, progress)
            if self._thread is None:
                self.step()  # no scheduler thread: finish the running rows here
            else:
                time.sleep(0.01)

    def _idle_lengths(self, b: int) -> list[int]:
        """The valid KV length of each of rows 0 .. b-1 (warm-up steps write only past it)."""
        return [self.pool.length[r] for r in range(b)]

    def _prepare(self, timer: Runner, todo: list, timed: list[str], limit: int, total: int, progress) -> int:
        done = captured = 0
        for job in todo:
            captured += job()
            done += 1
            if progress is not None:
                progress(done, total)
        for b in timer.buckets:
            plain = last = None
            for n in timed:
                tree = self.trees[n]
                done += 1
                if plain is not None and last >= self.meter.optimistic(n) * plain:
                    continue  # costs at least `last`: cannot beat plain decoding
                kv = timer.kv_len(min(limit, 256), tree.num_nodes)
                last = timer.time_step(tree, b, kv, self._idle_lengths(b))
                plain = last if plain is None else plain
                self.cost.seed(b, tree.num_nodes, last)
                if progress is not None:
                    progress(done, total)
        if progress is not None:
            progress(total, total)
        return captured
