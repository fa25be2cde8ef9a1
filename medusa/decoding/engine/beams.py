"""Beam search in the engine: a request with beams=K > 1 takes K running rows of the engine's
pool and decodes in the same batched steps as every other request, scored by
medusa.decoding.beam.

Each of its rows is a BeamMember: a running row to the scheduler (it is admitted, stepped,
swapped and released as any row; greedy, its speculation switch the request's), whose output
the engine does not emit: after a step, the beam rows' verified paths (the emitted tokens and
their best alternatives, logprobs.TOP_COMPUTED per position: a step with a beam row computes
log-probabilities) go to `beam.advance`, which runs as many beam steps as the paths make exact.
Then every new beam's row becomes a copy of its parent's (`Runner.copy_rows`: KV prefix, head
state, hidden state; `beam.place` keeps each parent's first child in its own row, so only the
other children copy), holding the beams' common KV length and the beam's last token as root.

Admission: a beam request waits until K rows are free (FIFO: requests behind it wait too); its
prompt prefills once, in its first row, and the first beam step expands that distribution.

The whole output comes on the final event: the best hypothesis's tokens, and `beams`, the
num_return best hypotheses with their scores (HF's sequences_scores). A mixin of Engine
(core.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from medusa.decoding.beam import BeamSearch, Path, advance, place
from medusa.decoding.engine.requests import Live, RequestStats, TokenEvent, beam_params
from medusa.decoding.sampling import BatchSampling, SamplingParams


@dataclass(eq=False)
class BeamRun:
    live: Live  # the beam request's own record (it holds no row)
    search: BeamSearch
    members: list  # [BeamMember]: the request's rows
    beams: list  # the member holding each running beam
    kv: int  # committed KV slots of every beam row (all beams have one length)
    steps: int = 0  # verification steps
    beam_steps: list[int] = field(default_factory=list)  # beam steps each ran (a beam step: one token of every beam)
    tree: str = "ar"


@dataclass(eq=False)
class BeamMember(Live):
    """One row of a beam request, to the scheduler a running greedy request."""

    run: BeamRun | None = None

    @property
    def kv_len(self) -> int:
        return self.run.kv


class Beams:
    def _beam_start(self, live: Live) -> None:
        """Admit a beam request into K free rows and prefill its prompt in the first."""
        req = live.req
        K = req.beams
        live.t_admit = time.perf_counter()
        row_req = replace(req, sampling=SamplingParams(), beams=1, num_return=1, logprobs=None)
        run = BeamRun(live, BeamSearch(beam_params(req), req.max_new_tokens, frozenset(live.eos)), [], [],
                      len(req.prompt_ids))
        for i in range(K):
            m = BeamMember(replace(row_req, request_id=f"{req.request_id}/beam{i}"), live.handle, live.eos,
                           live.t_submit, None, run=run)
            adm = self.pool.admit(m.req.request_id, req.prompt_ids)
            self._apply_swaps(adm.swaps)
            m.row = adm.row
            self._rows[adm.row] = m
            run.members.append(m)
        self._beam_runs[req.request_id] = run
        first = run.members[0]
        t0 = time.perf_counter()
        root = self.runner.prefill(first.row, [list(req.prompt_ids)], [0], BatchSampling.stack([SamplingParams()], self.device),
                                   None, logprobs=True)
        self._time["prefill"] += time.perf_counter() - t0
        self._time["prefills"] += 1
        for m in run.members:
            self.pool.length[m.row] = len(req.prompt_ids) if m is first else 0
        live.t_first = time.perf_counter()
        lp = self.runner.prefill_logprobs
        run.beams = [first]
        self._beam_apply(run, [Path([int(root[0])], lp.top_ids[0].tolist(), lp.top_lp[0].tolist())], first=True)

    def _beam_paths(self, lives: list, packed: list[list[int]], logprobs) -> dict[BeamMember, Path]:
        """Each beam row's verified path in this step (read before any release moves rows)."""
        idx = [i for i, x in enumerate(lives) if isinstance(x, BeamMember)]
        if not idx:
            return {}
        ids, lps = logprobs.top_ids[idx].tolist(), logprobs.top_lp[idx].tolist()
        return {lives[i]: Path(packed[i][1:2 + packed[i][0]], a, b) for i, a, b in zip(idx, ids, lps)}

    def _beam_advance(self, paths: dict[BeamMember, Path], tree: str) -> None:
        """After a step: each beam request's beam steps over its rows' paths."""
        for run in {m.run: None for m in paths}:
            run.steps += 1
            run.tree = tree
            self._beam_apply(run, [paths[m] for m in run.beams], first=False)

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
        by_row = {m.row: m for m in run.members}
        rows, copies = place([run.beams[o].row for o, _ in new], list(by_row))
        self.runner.copy_rows(copies, run.kv, rows, [t for _, t in new])
        run.beams = [by_row[r] for r in rows]
        for m in run.members:
            self.pool.length[m.row] = run.kv

    def _beam_finish(self, run: BeamRun, reason: str | None) -> None:
        """End a beam request: its final event (the best hypothesis; `reason` overrides eos /
        length, e.g. "cancelled"), its rows back to the pool."""
        live, req = run.live, run.live.req
        self._beam_runs.pop(req.request_id, None)
        for m in run.members:
            r, m.row = m.row, -1
            self._rows[r] = None
            self._apply_swaps(self.pool.release(r))
        hyps = tuple(run.search.results()) if reason is None else ()
        best = list(hyps[0].tokens) if hyps else []
        if reason is None:
            reason = "eos" if best and best[-1] in live.eos else "length"
        now = time.perf_counter()
        stats = RequestStats(
            prompt_tokens=len(req.prompt_ids), new_tokens=len(best), steps=run.steps,
            mean_accepted=sum(run.beam_steps) / run.steps if run.steps else 0.0, reused_tokens=0,
            ttft_s=(live.t_first or now) - live.t_submit, seconds=now - live.t_submit, tree=run.tree,
            queue_s=(live.t_admit or now) - live.t_submit, beam_steps=tuple(run.beam_steps))
        with self._mu:
            self._live.pop(req.request_id, None)
        live.handle.push(TokenEvent(req.request_id, best, reason, stats, len(best), None, hyps))
