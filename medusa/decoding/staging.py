"""The staging buffers of a padded prefill, and how admitted prompts are split into forwards.

A padded prefill of k fresh prompts (no reused session prefix), right-padded to T tokens, runs
at its shape bucket (R, Tb): R the row bucket of k, Tb the prompt bucket of T (buckets.py).
The forward runs the model over a staging KV cache of R rows x Tb slots that starts every
prompt at position 0, then writes the final hidden states to a static buffer; afterwards the
first T slots of the k real rows are copied into the engine's pool rows. What the padding
(rows k .. R-1, positions T .. Tb-1) computes is never read: rows do not mix, and causal
attention keeps padding positions out of every real token's view. Draft heads with state
(Hydra++) observe the prompt in the same forward, into a staging head state whose first T
slots are copied likewise.

All shapes share one staging buffer (views of its first R*Tb token slots), one token buffer and
one hidden-state buffer, so prefills run one at a time. Whether a forward is replayed as a
CUDA graph is the runner's business (runner.py); this module only owns the buffers, the
forward at a shape, and the cost of a shape (measured replays, else a linear fit).

`plan_groups` cuts prompts admitted together into forwards: sorted by length, then cut where
the padding saved outweighs a forward's fixed cost. One forward over every prompt pads each to
the longest: chat prompts are short with a long tail (MT-Bench: median 68 tokens, longest
402), so 16 of them in one forward would mostly compute padding."""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

from medusa.decoding.buckets import batch_buckets, bucket_of, length_buckets
from medusa.decoding.kv_pool import copy_state_prefix, state_rows, write_back
from medusa.decoding.step import attention_mask
from medusa.model.kv_cache import KVCache

FIXED_TOKENS = 1024  # a prefill forward's fixed cost in padded token slots, until bucket times are measured


def plan_groups(lengths: list[int], cost: Callable[[int, int], float | None]) -> list[int]:
    """Cut prompts, in the given order, into consecutive groups that each share one padded
    forward, minimising the summed cost. lengths: each prompt's new tokens (sort them first:
    then a group's padding is the least the cut allows); cost(k, T): the cost of one forward
    over k prompts of up to T tokens, None when they cannot share one (a group's cost must not
    fall as it grows). A prompt alone is always allowed. Returns the group sizes, in order."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[i]: the cheapest split of the first i prompts
    cut = list(range(-1, n))  # cut[i]: where the last group of that split starts (at first: alone)
    for i in range(1, n + 1):
        T = 0
        for j in range(i - 1, -1, -1):  # the last group is prompts j .. i-1
            T = max(T, lengths[j])
            c = cost(i - j, T)
            if c is None and i - j > 1:
                break  # more prompts, or longer ones, fit no better
            c = 0.0 if c is None else c  # a prompt no forward takes runs alone whatever the split
            if best[j] + c < best[i]:
                best[i], cut[i] = best[j] + c, j
    sizes = []
    i = n
    while i > 0:
        sizes.append(i - cut[i])
        i = cut[i]
    return sizes[::-1]


class PrefillStage:
    def __init__(self, model, max_rows: int, max_len: int, capacity: int, heads=None, fine: bool = False):
        """max_rows: most prompts one prefill takes; max_len: longest prompt; capacity: most
        token slots (R x Tb, padding included) of one prefill, at least max_len; heads: draft
        heads whose state (if any) sees the prompts in the forward; fine: prompt buckets every
        16 tokens (eager prefills; buckets.length_buckets)."""
        self.model = model
        self.row_buckets = batch_buckets(max_rows)
        self.len_buckets = length_buckets(max_len, fine)
        self.capacity = max(capacity, self.len_buckets[-1])
        cfg, dev = model.cfg, model.device
        self._per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim  # K and V values per token slot
        with torch.inference_mode():
            self._kv = torch.zeros(self.capacity * self._per_token, dtype=model.dtype, device=dev)
            self._tokens = torch.zeros(self.capacity, dtype=torch.long, device=dev)
            self._hidden = torch.zeros(self.capacity * cfg.hidden_size, dtype=model.dtype, device=dev)
            self._lengths = torch.ones(self.row_buckets[-1], dtype=torch.long, device=dev)  # [max_rows]
            self.heads = heads
            self._head_state = heads.new_state(self.row_buckets[-1], self.len_buckets[-1], model) if heads is not None else None
        self.times: dict[tuple[int, int], float] = {}  # (R, Tb) -> seconds of one forward (measured at warm-up)
        self._fit: tuple[float, float] = (float(FIXED_TOKENS), 1.0)  # cost = a + b * R * Tb when unmeasured

    def shape(self, k: int, T: int) -> tuple[int, int] | None:
        """The bucket (R, Tb) of k prompts of up to T tokens, or None when it exceeds the capacity."""
        R, Tb = bucket_of(k, self.row_buckets), bucket_of(T, self.len_buckets)
        if R is None or Tb is None or R * Tb > self.capacity:
            return None
        return R, Tb

    def shapes(self, max_len: int | None = None) -> list[tuple[int, int]]:
        """Every bucket within the capacity (prompts up to max_len tokens)."""
        top = self.shape(1, max_len or self.len_buckets[-1])
        lens = [t for t in self.len_buckets if top is None or t <= top[1]]
        return [(R, Tb) for Tb in lens for R in self.row_buckets if R * Tb <= self.capacity]

    @property
    def observes(self) -> bool:
        """Whether the forward also shows the prompts to the draft heads' state."""
        return self._head_state is not None

    def _views(self, R: int, Tb: int) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        cfg = self.model.cfg
        shape = (cfg.num_layers, 2, R, cfg.num_kv_heads, Tb, cfg.head_dim)
        stage = KVCache(self._kv[: R * Tb * self._per_token].view(shape))
        tokens = self._tokens[: R * Tb].view(R, Tb)
        hidden = self._hidden[: R * Tb * cfg.hidden_size].view(R, Tb, cfg.hidden_size)
        return tokens, stage, hidden

    def forward(self, R: int, Tb: int) -> None:
        """The padded forward of one bucket over the static buffers (what a graph replays)."""
        tokens, stage, hidden = self._views(R, Tb)
        dev = tokens.device
        positions = torch.arange(Tb, device=dev)[None].expand(R, Tb)  # [R, Tb]
        mask = attention_mask(torch.zeros(R, dtype=torch.long, device=dev),
                              torch.ones(Tb, Tb, dtype=torch.bool, device=dev).tril(), Tb)  # [R, Tb, Tb]
        h = self.model(tokens, positions, stage, positions, mask, logits_for=None).hidden
        hidden.copy_(h)
        if self._head_state is not None:
            hs = state_rows(self._head_state, 0, R)
            self.heads.observe(hs, h, positions, self._lengths[:R], kv_len=Tb)
            write_back(self._head_state, hs, 0, R)

    def run(self, tokens: torch.Tensor, cache: KVCache, lengths: torch.Tensor | None = None, head_state=None,
            forward=None) -> torch.Tensor:
        """Prefill k fresh prompts (tokens [k, T], right-padded; lengths [k]), writing their K/V
        into slots 0 .. T-1 of `cache` (the k pool rows' view) and, when `observes`, the heads'
        state into `head_state` (the same rows' view). forward(R, Tb) runs the bucket's forward
        (default: `self.forward`; the runner replays its graph). Returns the final hidden states
        [k, T, D] (a view of a buffer the next prefill overwrites)."""
        k, T = tokens.shape
        R, Tb = self.shape(k, T)
        tok, stage, hidden = self._views(R, Tb)
        tok[:k, :T].copy_(tokens)  # the rest holds earlier tokens: valid ids that only padding sees
        if self.observes:
            self._lengths[:k].copy_(lengths if lengths is not None else torch.full((k,), T))
        (forward or self.forward)(R, Tb)
        cache.kv[:, :, :, :, :T].copy_(stage.kv[:, :, :k, :, :T])
        if self.observes:
            copy_state_prefix(head_state, self._head_state, k, T)
        return hidden[:k, :T]

    # -------------------------------------------------------------- cost
    def cost(self, k: int, T: int) -> float | None:
        """What one prefill forward of k prompts of up to T tokens costs (for plan_groups): its
        bucket's measured time, else a + b * R * Tb (fitted to the measured buckets, or
        FIXED_TOKENS + R * Tb before any was measured). None when the bucket exceeds the capacity."""
        shape = self.shape(k, T)
        if shape is None:
            return None
        t = self.times.get(shape)
        if t is not None:
            return t
        a, b = self._fit
        return a + b * shape[0] * shape[1]

    def measured(self, R: int, Tb: int, seconds: float) -> None:
        """Record a bucket's measured forward time and refit the cost of unmeasured buckets (least
        squares of the measured times over R * Tb token slots)."""
        self.times[(R, Tb)] = seconds
        pts = [(r * t, s) for (r, t), s in self.times.items()]
        xs = {x for x, _ in pts}
        if len(xs) < 2:
            return
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(t for _, t in pts)
        b = sum((x - mx) * (t - my) for x, t in pts) / sum((x - mx) ** 2 for x, _ in pts)
        b = max(b, 1e-12)
        self._fit = (max(my - b * mx, 0.0), b)
