"""The engine's output half: a step's new tokens reach the request's stream (stop sequences,
EOS and the token limit cut them there), and a finished request frees its row (keeping its KV
under its session id when it asked) and gets its RequestStats.

A mixin of Engine (core.py)."""
from __future__ import annotations

import time

from medusa.decoding.engine.requests import Live, RequestStats, TokenEvent
from medusa.decoding.stopping import stop_cut


class Output:
    def _emit(self, live: Live, new: list[int]) -> None:
        req = live.req
        before = len(live.out)
        live.out.extend(new)
        if live.lookup is not None:
            live.lookup.extend(new)
        if live.row >= 0:
            self.pool.length[live.row] = live.kv_len
        limit = req.max_new_tokens
        view = live.out if len(live.out) <= limit else live.out[:limit]
        cut = stop_cut(view, min(before, len(view)), live.eos, req.stop_sequences)
        if cut is None and len(live.out) >= limit:
            cut = (limit, "length")
        if cut is None:
            lp = live.logprobs[live.sent:] if req.logprobs is not None else None
            live.handle.push(TokenEvent(req.request_id, live.out[live.sent:], produced=len(new), logprobs=lp))
            live.sent = len(live.out)
            return
        self._finish(live, cut[1], keep=True, end=cut[0], produced=len(new))

    def _finish(self, live: Live, reason: str, keep: bool, end: int | None = None, produced: int = 0) -> None:
        req = live.req
        end = live.sent if end is None else end
        if live.row >= 0:
            r, live.row = live.row, -1
            keep_tokens = None
            if keep and req.session_id is not None:
                keep_tokens = (list(req.prompt_ids) + live.out[:-1])[:self.keep_cap]  # committed KV slots
            self._rows[r] = None
            self._apply_swaps(self.pool.release(r, req.session_id if keep_tokens else None, keep_tokens))
        now = time.perf_counter()
        stats = RequestStats(
            prompt_tokens=len(req.prompt_ids), new_tokens=end, steps=live.steps,
            mean_accepted=live.step_tokens / live.steps if live.steps else 0.0,
            reused_tokens=live.reused, ttft_s=(live.t_first or now) - live.t_submit,
            seconds=now - live.t_submit, tree=live.tree, queue_s=(live.t_admit or now) - live.t_submit)
        with self._mu:
            self._live.pop(req.request_id, None)
        lp = live.logprobs[live.sent:end] if req.logprobs is not None else None
        live.handle.push(TokenEvent(req.request_id, live.out[live.sent:end], reason, stats, produced, lp))
        live.sent = end
