"""The engine's scheduler half: the request inbox and the scheduler thread's loop,
cancellations, admission into the row pool (kv_pool.RowPool: running rows are kept in rows
0 .. n-1, swaps keep it so), prefill grouping (fresh prompts sorted by length and cut into
padded forwards where padding would cost more than another forward: staging.plan_groups;
rows continuing a kept session join the last group while it fits). Every change to device
state goes through the runner.

A mixin of Engine (core.py): it works on the engine's pool, rows and runner, and knows nothing
of the speculation policy or of how a step is run."""
from __future__ import annotations

import collections
import logging
import time

import torch

from medusa.decoding.engine.requests import Live
from medusa.decoding.kv_pool import Swap
from medusa.decoding.logprobs import host_entries
from medusa.decoding.sampling import BatchSampling
from medusa.decoding.staging import plan_groups


class Scheduler:
    def _loop(self) -> None:
        with torch.inference_mode():  # for the thread's life: entering it per step costs host time
            self._serve()

    def _serve(self) -> None:
        while True:
            if not self.pool.n_active or self._stopping:  # busy rows: straight on, no lock to take
                with self._wake:
                    while not self._stopping and not (self._waiting or self._cancels or self.pool.n_active):
                        self._wake.wait(0.5)
                    if self._stopping:
                        return
            try:
                self.step()
            except Exception as e:  # a bug must not leave clients waiting forever
                logging.getLogger("medusa.decoding.engine").exception("engine step failed; failing the requests in flight")
                self._fail_all(e)

    def _fail_all(self, exc: Exception) -> None:
        with self._step_lock, torch.inference_mode():
            for run in list(self._beam_runs.values()):
                self._beam_finish(run, "error")
            for live in [x for x in self._rows if x is not None]:
                self._finish(live, "error", keep=False)
            with self._mu:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for live in waiting:
                self._finish(live, "error", keep=False)
            for sid in list(self.pool.lru):
                self.pool.drop_session(sid)
        self._last_error = repr(exc)

    def _apply_cancels(self) -> bool:
        if not self._cancels:  # the usual step: nothing to take the lock for (a cancel arriving now waits a step)
            return False
        with self._mu:
            ids, self._cancels = self._cancels, set()
            waiting = [x for x in self._waiting if x.req.request_id in ids]
            for x in waiting:
                self._waiting.remove(x)
        for x in waiting:
            self._finish(x, "cancelled", keep=False)
        running = [x for x in self._rows if x is not None and x.req.request_id in ids]
        beams = [run for rid, run in self._beam_runs.items() if rid in ids]
        for run in beams:
            self._beam_finish(run, "cancelled")
        for x in running:
            self._finish(x, "cancelled", keep=False)
        return bool(waiting or running or beams)

    def _admit(self) -> bool:
        """Admit waiting requests in order while rows are free (a beam request takes K rows and
        prefills alone: engine/beams.py), then prefill the others in groups of consecutive
        rows, one padded forward each. Fresh prompts come first, sorted by length and cut where
        the padding saved outweighs a forward's fixed cost (staging.plan_groups); requests
        continuing a kept session follow, joining the last group while it fits."""
        if not self._waiting or not self._admit_now():
            return False
        with self._mu:  # in order while rows are free: a beam request needs K (engine/beams.py)
            room = self.pool.max_active - self.pool.n_active
            batch, beams = [], []
            while self._waiting and (need := max(1, self._waiting[0].req.beams)) <= room:
                (beams if need > 1 else batch).append(self._waiting.popleft())
                room -= need
        if batch:
            self._admit_plain(batch)
        for live in beams:
            self._beam_start(live)
        return bool(batch or beams)

    def _admit_plain(self, batch: list[Live]) -> None:
        batch.sort(key=lambda x: (x.req.session_id in self.pool.lru, len(x.req.prompt_ids)))  # stable: FIFO ties
        admitted: list[Live] = []
        t_admit = time.perf_counter()
        for live in batch:  # each takes the next row: the admitted rows are consecutive, in this order
            live.t_admit = t_admit
            adm = self.pool.admit(live.req.request_id, live.req.prompt_ids, live.req.session_id)
            self._apply_swaps(adm.swaps)
            live.row, live.reused = adm.row, adm.reused
            self._rows[adm.row] = live
            admitted.append(live)
        fresh = next((i for i, x in enumerate(admitted) if x.reused), len(admitted))
        groups: list[list[Live]] = []
        i = 0
        for k in plan_groups([len(x.req.prompt_ids) for x in admitted[:fresh]], self._prefill_cost):
            groups.append(admitted[i:i + k])
            i += k
        for live in admitted[fresh:]:
            if groups and self._fits(groups[-1] + [live]):
                groups[-1].append(live)
            else:
                groups.append([live])
        t0 = time.perf_counter()
        roots = [r for g in groups for r in self._prefill(g)]
        self._time["prefill"] += time.perf_counter() - t0
        self._time["prefills"] += len(groups)
        for live in admitted:  # the prefilled KV is valid now: a release emitting below swaps rows with their lengths
            self.pool.length[live.row] = len(live.req.prompt_ids)
        now = time.perf_counter()
        for live, root in zip(admitted, roots):  # emit only now: a request that ends frees (swaps) rows
            live.t_first = now
            self._emit(live, [root])

    def _admit_now(self) -> bool:
        """Coalesce admissions while rows run: every prefill forward has a fixed cost (a graph
        replay and the copy of its KV on a GPU, plus the draft heads' eager prefix layer while the
        engine speculates), so admission waits until admit_group requests (max_batch / 4) can be
        admitted together (as many waiting and as many free rows) or the oldest has waited
        admit_wait_steps steps (16; TGI's max-waiting-tokens idea). Without running rows, or with
        admit_wait_steps 0, admission is immediate."""
        if not self.pool.n_active or not self.admit_wait_steps:
            return True
        with self._mu:
            if not self._waiting:
                return False
            waiting, oldest = len(self._waiting), self._waiting[0].queued_step
        room = self.pool.max_active - self.pool.n_active
        # a deep queue waits for room too: rows freed one at a time would each cost a forward
        return min(waiting, room) >= self.admit_group or self.policy.steps - oldest >= self.admit_wait_steps

    def _prefill_cost(self, k: int, T: int) -> float | None:
        """One prefill forward's cost for plan_groups: k fresh prompts of up to T tokens."""
        return self.runner.prefill_cost(k, T)

    def _fits(self, group: list[Live]) -> bool:
        T = max(len(x.req.prompt_ids) - x.reused for x in group)
        top = max(x.reused for x in group) + T  # padding slots and positions stay inside the row and context
        if top > min(self.row_len, self.max_pos):
            return False
        if not any(x.reused for x in group):  # padded to its bucket
            return self.runner.prefill_shape(len(group), T) is not None
        return len(group) * T <= self.prefill_tokens

    def _apply_swaps(self, swaps: list[Swap]) -> None:
        if swaps:
            self.runner.swap_rows(swaps)  # the tensors (every rank of a tensor-parallel replica)
        for s in swaps:
            self._rows[s.a], self._rows[s.b] = self._rows[s.b], self._rows[s.a]
            for r in (s.a, s.b):
                if self._rows[r] is not None:
                    self._rows[r].row = r

    def _prefill(self, group: list[Live]) -> list[int]:
        """One prefill forward over the group's rows (consecutive), prompts right-padded. Returns
        each row's first token (the caller emits them)."""
        dev = self.device
        r0 = group[0].row
        new = [list(x.req.prompt_ids[x.reused:]) for x in group]
        sampling = BatchSampling.stack([x.req.sampling for x in group], dev)
        u = None
        if sampling.any_random:
            zero = torch.zeros(1, device=dev)
            u = torch.stack([x.uniforms.at(0, torch.zeros(1, dtype=torch.long, device=dev), 0)
                             if x.uniforms is not None else zero for x in group])  # [k, 1]
        want = [x.req.logprobs for x in group]
        asked = any(w is not None for w in want)
        roots = self.runner.prefill(r0, new, [x.reused for x in group], sampling, u, logprobs=asked).tolist()
        if asked:  # the first token's logprobs, from the prefill's last logits (emitted by the caller)
            for x, e in zip(group, host_entries(self.runner.prefill_logprobs, [[r] for r in roots], want)):
                if e is not None:
                    x.logprobs.extend(e)
        return roots
