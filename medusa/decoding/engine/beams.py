"""Beam search in the engine: a request with beams=K > 1 runs K pool rows of the engine through
its runner (its KV pool, its step graphs, a tensor-parallel replica's replay), scored by
medusa.decoding.beam.

How it runs (a driver over the runner, not rows of the batched step): a beam request waits at
the head of the queue until no other request runs, takes pool rows 0 .. K-1 and runs alone, one
verification step over its K rows per scheduler iteration, until its search ends; requests
behind it wait (FIFO). Its prompt prefills once, in one row; its first beam step expands that
row's distribution, and every beam step's reorder makes a new beam's row a copy of its parent's
(`Runner.copy_rows`: KV prefix, head state, hidden state; `beam.place` keeps each parent's
first child in place, so only the other children copy).

Each step verifies every beam's tree (the engine's default tree when the request speculates and
heads are loaded, its heads' nodes only; the one-node tree for speculation="off") greedily, with
the emitted tokens' log-probabilities and their best alternatives (logprobs.TOP_COMPUTED per
position), and `beam.advance` runs as many beam steps as the verified paths make exact.

The whole output comes on the final event: the best hypothesis's tokens, and `beams`, the
num_return best hypotheses with their scores (HF's sequences_scores). A mixin of Engine
(core.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from medusa.decoding.beam import BeamSearch, Path, advance, place
from medusa.decoding.engine.requests import Live, RequestStats, TokenEvent, beam_params
from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.tree import Tree


@dataclass(eq=False)
class BeamRun:
    live: Live
    search: BeamSearch
    rows: list[int]  # the request's pool rows
    beam_rows: list[int]  # row of each running beam
    kv: int  # committed KV slots of every beam row (all beams have one length)
    tree: Tree
    sampling: BatchSampling
    steps: int = 0  # verification steps
    beam_steps: list[int] = field(default_factory=list)  # beam steps each ran (a beam step: one token of every beam)


class Beams:
    _beam: BeamRun | None = None

    def _is_beam(self, live: Live) -> bool:
        return live.req.beams > 1

    def _beam_start(self, live: Live) -> None:
        """Admit a beam request into rows 0 .. K-1 of an idle pool and prefill its prompt in one row."""
        req = live.req
        K = req.beams
        rows = []
        for i in range(K):
            adm = self.pool.admit(f"{req.request_id}/beam{i}", req.prompt_ids)
            self._apply_swaps(adm.swaps)
            rows.append(adm.row)
        live.t_admit = time.perf_counter()
        spec = self.heads is not None and req.speculation != "off"
        tree = self.default_tree if spec else self.trees["ar"]
        if tree.lookup:  # lookup chains are per row state of a plain request: the heads' nodes only
            tree = self.trees[tree.heads_only.name]
        greedy = BatchSampling.stack([SamplingParams()] * K, self.device)
        search = BeamSearch(beam_params(req), req.max_new_tokens, frozenset(live.eos))
        run = self._beam = BeamRun(live, search, rows, [rows[0]], len(req.prompt_ids), tree, greedy)
        t0 = time.perf_counter()
        one = BatchSampling.stack([SamplingParams()], self.device)
        root = self.runner.prefill(rows[0], [list(req.prompt_ids)], [0], one, None, logprobs=True)
        self._time["prefill"] += time.perf_counter() - t0
        self._time["prefills"] += 1
        live.t_first = time.perf_counter()
        lp = self.runner.prefill_logprobs
        path = Path([int(root[0])], lp.top_ids[0].tolist(), lp.top_lp[0].tolist())
        self._beam_apply(run, [path], first=True)

    def _beam_step(self) -> None:
        """One verification step over the beam rows and the beam steps it makes exact."""
        run = self._beam
        K = len(run.beam_rows)
        n = len(run.rows)  # rows 0 .. n-1: the request's (K of them, beams ride in any of them)
        t0 = time.perf_counter()
        pad = [self.pool.length[r] for r in range(n, self.runner.bucket(n))]
        acc, _ = self.runner.step(run.tree, n, [run.kv] * n, run.sampling, ("beam", id(run)), None, None, pad,
                                  logprobs=True)
        packed = acc.packed.tolist()
        ids, lps = acc.logprobs.top_ids[:n].tolist(), acc.logprobs.top_lp[:n].tolist()
        self._time["step"] += time.perf_counter() - t0
        paths = [Path(packed[r][1:2 + packed[r][0]], ids[r], lps[r]) for r in run.beam_rows[:K]]
        run.steps += 1
        self._beam_apply(run, paths, first=False)

    def _beam_apply(self, run: BeamRun, paths: list[Path], first: bool) -> None:
        new, S = advance(run.search, paths)
        if not first:
            run.beam_steps.append(S)
        if run.search.done:
            self._beam_finish(run, None)
            return
        # a new beam: its ancestor's KV (prompt, then beam tokens through the root), then S - 1
        # verified path tokens in the cache; its token is the next root (after a prefill the
        # distribution was the prompt's last, already in the cache)
        run.kv += S - 1 if first else S
        parents = [run.beam_rows[o] for o, _ in new]
        rows, copies = place(parents, run.rows)
        self.runner.copy_rows(copies, run.kv, rows, [t for _, t in new])
        run.beam_rows = rows
        for r in run.rows:
            self.pool.length[r] = run.kv

    def _beam_finish(self, run: BeamRun, reason: str | None) -> None:
        """End the beam request: its final event (the best hypothesis; `reason` overrides
        eos / length, e.g. "cancelled"), its rows back to the pool."""
        self._beam = None
        live, req = run.live, run.live.req
        for r in sorted(run.rows, reverse=True):  # the last rows first: no swaps
            self._apply_swaps(self.pool.release(r))
        hyps = tuple(run.search.results()) if reason is None else ()
        best = list(hyps[0].tokens) if hyps else []
        if reason is None:
            reason = "eos" if best and best[-1] in live.eos else "length"
        now = time.perf_counter()
        stats = RequestStats(
            prompt_tokens=len(req.prompt_ids), new_tokens=len(best), steps=run.steps,
            mean_accepted=sum(run.beam_steps) / run.steps if run.steps else 0.0, reused_tokens=0,
            ttft_s=(live.t_first or now) - live.t_submit, seconds=now - live.t_submit, tree=run.tree.name,
            queue_s=(live.t_admit or now) - live.t_submit, beam_steps=tuple(run.beam_steps))
        with self._mu:
            self._live.pop(req.request_id, None)
        live.handle.push(TokenEvent(req.request_id, best, reason, stats, len(best), None, hyps))
