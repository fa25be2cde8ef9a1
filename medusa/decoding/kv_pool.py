"""The engine's KV pool: a fixed number of cache rows (each the maximum sequence length), who
holds each row, and the LRU of kept session rows.

Invariant: the running requests occupy rows 0 .. n_active-1, so a batched step runs on a
zero-copy view of the first rows. Rows from n_active on are free or hold a kept session (the
KV of a finished turn, waiting for its next turn). Admission and release keep the invariant by
swapping two rows; the pool returns the swaps and the caller applies them to its tensors
(`swap_cache_rows`, and each head state's PerRow.swap_rows). The bookkeeping (`RowPool`) is plain Python over ints; it knows nothing of
models, tensors, sampling or requests beyond their ids."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from medusa.model.kv_cache import KVCache


@dataclass(frozen=True)
class Swap:
    a: int
    b: int
    len_a: int  # valid KV slots of row a before the swap
    len_b: int


@dataclass(frozen=True)
class Admission:
    row: int  # the request's row (always the previous n_active)
    reused: int  # leading prompt tokens whose KV the row already holds (a kept session)
    swaps: list[Swap] = field(default_factory=list)
    evicted: str | None = None  # session dropped to make room


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RowPool:
    """Row bookkeeping. `length[r]` is the number of valid KV slots of row r (the caller keeps
    it current for running rows, so swaps copy only what matters)."""

    def __init__(self, rows: int, max_active: int):
        if rows < 1:
            raise ValueError("the KV pool needs at least one row")
        self.rows = rows
        self.max_active = max(1, min(max_active, rows))
        self.owner: list[str | None] = [None] * rows  # request id of running rows
        self.session: list[str | None] = [None] * rows  # session id of kept rows
        self.tokens: list[list[int] | None] = [None] * rows  # token ids whose KV a kept row holds
        self.length: list[int] = [0] * rows
        self.lru: OrderedDict[str, int] = OrderedDict()  # session id -> row, least recent first
        self.n_active = 0

    # ---------------------------------------------------------------- queries
    def can_admit(self) -> bool:
        return self.n_active < self.max_active

    @property
    def kept(self) -> int:
        return len(self.lru)

    @property
    def free(self) -> int:
        return self.rows - self.n_active - len(self.lru)

    # ---------------------------------------------------------------- changes
    def admit(self, request_id: str, prompt: list[int], session_id: str | None = None) -> Admission:
        """Give the request row n_active. A kept row of its session whose tokens share a prefix
        with the prompt is reused (at most len(prompt) - 1 tokens: one token must run)."""
        if not self.can_admit():
            raise RuntimeError("no row free for a running request")
        swaps: list[Swap] = []
        reused, evicted = 0, None
        src = None
        if session_id is not None and session_id in self.lru:
            r = self.lru.pop(session_id)
            reused = min(common_prefix(self.tokens[r], prompt), len(prompt) - 1)
            self._clear(r)
            self.length[r] = reused
            src = r
        if src is None:
            src = next((r for r in range(self.n_active, self.rows) if self.session[r] is None), None)
            if src is None:  # every idle row holds a session: evict the least recent
                evicted, src = self.lru.popitem(last=False)
                self._clear(src)
        dst = self.n_active
        if src != dst:
            swaps.append(self._swap(src, dst))
        self.owner[dst] = request_id
        self.length[dst] = reused
        self.n_active += 1
        return Admission(dst, reused, swaps, evicted)

    def release(self, row: int, session_id: str | None = None, tokens: list[int] | None = None) -> list[Swap]:
        """A running request left row `row`. With a session id, its KV (`tokens`, one slot per
        token) is kept for the session's next turn. Returns the swap that restores the invariant."""
        if not (0 <= row < self.n_active) or self.owner[row] is None:
            raise RuntimeError(f"row {row} is not running")
        self.owner[row] = None
        if session_id is not None and tokens:
            old = self.lru.pop(session_id, None)
            if old is not None:  # a newer turn of the same session replaces the kept one
                self._clear(old)
            self.session[row] = session_id
            self.tokens[row] = list(tokens)
            self.length[row] = len(tokens)
            self.lru[session_id] = row
        else:
            self.length[row] = 0
        last = self.n_active - 1
        swaps = [self._swap(row, last)] if row != last else []
        self.n_active -= 1
        return swaps

    def drop_session(self, session_id: str) -> bool:
        r = self.lru.pop(session_id, None)
        if r is None:
            return False
        self._clear(r)
        return True

    # ---------------------------------------------------------------- internals
    def _clear(self, r: int) -> None:
        self.session[r], self.tokens[r], self.length[r] = None, None, 0

    def _swap(self, a: int, b: int) -> Swap:
        s = Swap(a, b, self.length[a], self.length[b])
        for xs in (self.owner, self.session, self.tokens, self.length):
            xs[a], xs[b] = xs[b], xs[a]
        for r in (a, b):
            if self.session[r] is not None:
                self.lru[self.session[r]] = r  # keeps the LRU position (assignment does not move a key)
        return s


# -------------------------------------------------------------------- tensor side

class PerRow(Protocol):
    """State that holds one row per request and says so: the KV cache (its batch rows) and each
    head family's state (heads/hydra.py HydraState) implement it. The pool calls these and never
    looks inside, so a shared table that happens to have as many rows as the pool (RoPE tables)
    is never taken for per-row data."""

    def rows(self, lo: int, hi: int) -> "PerRow":
        """A view of rows lo .. hi-1 (in-place writes land in this state)."""

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows a and b in place."""

    def scratch(self) -> "PerRow":
        """A copy a trial step may change (a CUDA-graph warm-up): per-row values cloned, caches
        shared (steps write them only past the committed slots)."""

    def write_back(self, view: "PerRow", lo: int, hi: int) -> None:
        """Copy into rows lo .. hi-1 whatever `view` (from rows(lo, hi)) no longer shares."""

    def copy_prefix(self, src: "PerRow", k: int, T: int) -> None:
        """Rows 0 .. k-1 of src (of its caches, the first T slots) into rows 0 .. k-1 of this."""


# A draft-head state is None (no state), a PerRow, or a tensor whose first dimension is its rows
# (the simplest per-row state). The functions below dispatch on that.

def swap_cache_rows(cache: KVCache, s: Swap) -> None:
    """Exchange the valid KV slots of rows a and b (copies only len_a / len_b slots)."""
    if s.len_a or s.len_b:
        cache.swap_rows(s.a, s.b, s.len_a, s.len_b)


def state_rows(obj: Any, lo: int, hi: int) -> Any:
    """A view of rows lo .. hi-1 of a head state. In-place writes to the view land in the pool; a
    head family that rebinds a field instead needs `write_back` after the call."""
    if obj is None:
        return None
    return obj[lo:hi] if isinstance(obj, torch.Tensor) else obj.rows(lo, hi)


def swap_state_rows(obj: Any, a: int, b: int) -> None:
    """Exchange rows a and b of a head state (in place)."""
    if obj is None or a == b:
        return
    if isinstance(obj, torch.Tensor):
        obj[[a, b]] = obj[[b, a]]
    else:
        obj.swap_rows(a, b)


def scratch_state(obj: Any) -> Any:
    """A copy of a head state that a trial step may change (see PerRow.scratch)."""
    if obj is None:
        return None
    return obj.clone() if isinstance(obj, torch.Tensor) else obj.scratch()


def write_back(obj: Any, view: Any, lo: int, hi: int) -> None:
    """Copy into rows lo .. hi-1 of a head state whatever the view no longer shares with it."""
    if obj is None or view is None or obj is view:
        return
    if isinstance(obj, torch.Tensor):
        if view.data_ptr() != obj[lo:hi].data_ptr():
            obj[lo:hi] = view
    else:
        obj.write_back(view, lo, hi)


def copy_state_prefix(dst: Any, src: Any, k: int, T: int) -> None:
    """Copy rows 0 .. k-1 of head state `src` (of its caches, the first T slots) into `dst`, a
    state (or view) of k rows, in place."""
    if src is None or dst is None:
        return
    if isinstance(src, torch.Tensor):
        dst[:k].copy_(src[:k])
    else:
        dst.copy_prefix(src, k, T)


def copy_row(obj: Any, dst: int, src: int, T: int) -> None:
    """Row src of a KV cache or head state (of its caches, the first T slots) into row dst, in
    place (beam search: a new beam's row becomes a copy of its parent's)."""
    if obj is None or dst == src:
        return
    if isinstance(obj, torch.Tensor):
        obj[dst] = obj[src]
    else:
        obj.rows(dst, dst + 1).copy_prefix(obj.rows(src, src + 1), 1, T)
