"""The engine's prefill at fixed shapes, so that it can run as a CUDA graph.

A prefill forward run eagerly costs its kernel launches (about 50 ms for the default model on
an H100 host, whatever the prompt), several decode steps' worth: under load, admissions would
spend as much time launching prefills as decoding. Here a group of k fresh prompts (no reused
session prefix), right-padded to T tokens, runs in the graph of its shape bucket (R, Tb): R the
row bucket of k (1, 2, 4, ... max rows) and Tb the length bucket of T (16, 32, ... max_len).

The graph runs the model over a staging KV cache of R rows x Tb slots that starts every prompt
at position 0, then writes the final hidden states to a static buffer; after the replay the
first T slots of the k real rows are copied into the engine's pool rows. What the padding
(rows k .. R-1, positions T .. Tb-1) computes is never read: rows do not mix, and causal
attention keeps padding positions out of every real token's view. Draft heads with state
(Hydra++) observe the prompt inside the same graph, into a staging head state whose first T
slots are copied likewise. Rows with a reused prefix prefill eagerly (they attend to KV
already in the pool).

All shapes share one staging buffer (views of its first R*Tb token slots), one token buffer,
one hidden-state buffer and one graph memory pool: prefills run one at a time.
`capture=False` runs the same padded forward eagerly (the CPU tests use it)."""
from __future__ import annotations

import torch

from medusa.decoding.batch_graphs import batch_buckets
from medusa.decoding.graphs import capture
from medusa.decoding.kv_pool import copy_state_prefix, state_rows, write_back
from medusa.decoding.step import attention_mask
from medusa.model.kv_cache import KVCache

MIN_LEN_BUCKET = 16


def length_buckets(max_len: int) -> tuple[int, ...]:
    """16, 32, 64, ... below max_len, then max_len itself."""
    return tuple(b for b in batch_buckets(max_len) if b >= min(MIN_LEN_BUCKET, max_len))


class PrefillGraphs:
    def __init__(self, model, max_rows: int, max_len: int, capacity: int, capture: bool = True, heads=None):
        """max_rows: most prompts one prefill takes; max_len: longest prompt; capacity: most
        token slots (R x Tb, padding included) of one prefill, at least max_len; heads: draft
        heads whose state (if any) sees the prompts in the graph."""
        if capture and model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.capture = capture
        self.row_buckets = batch_buckets(max_rows)
        self.len_buckets = length_buckets(max_len)
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
        self.graphs: dict[tuple[int, int], object] = {}  # (R, Tb) -> replay
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    # -------------------------------------------------------------- shapes
    def shape(self, k: int, T: int) -> tuple[int, int] | None:
        """The bucket (R, Tb) of k prompts of up to T tokens, or None when it exceeds the capacity."""
        R = next((b for b in self.row_buckets if b >= k), None)
        Tb = next((b for b in self.len_buckets if b >= T), None)
        if R is None or Tb is None or R * Tb > self.capacity:
            return None
        return R, Tb

    def shapes(self, max_len: int | None = None) -> list[tuple[int, int]]:
        """Every bucket within the capacity (prompts up to max_len tokens)."""
        top = self.shape(1, max_len or self.len_buckets[-1])
        lens = [t for t in self.len_buckets if top is None or t <= top[1]]
        return [(R, Tb) for Tb in lens for R in self.row_buckets if R * Tb <= self.capacity]

    def _views(self, R: int, Tb: int) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        cfg = self.model.cfg
        shape = (cfg.num_layers, 2, R, cfg.num_kv_heads, Tb, cfg.head_dim)
        stage = KVCache(self._kv[: R * Tb * self._per_token].view(shape))
        tokens = self._tokens[: R * Tb].view(R, Tb)
        hidden = self._hidden[: R * Tb * cfg.hidden_size].view(R, Tb, cfg.hidden_size)
        return tokens, stage, hidden

    def _forward(self, R: int, Tb: int) -> None:
        """The padded forward of one bucket over the static buffers (what a graph replays)."""
        tokens, stage, hidden = self._views(R, Tb)
        dev = tokens.device
        positions = torch.arange(Tb, device=dev)[None].expand(R, Tb)  # [R, Tb]
        mask = attention_mask(torch.zeros(R, dtype=torch.long, device=dev),
                              torch.ones(Tb, Tb, dtype=torch.bool, device=dev).tril(), Tb)  # [R, Tb, Tb]
        h = self.model(tokens, positions, stage, positions, mask, logits_for=None).hidden
        hidden.copy_(h)
        if self._head_state is not None:
            rows = self.row_buckets[-1]
            hs = state_rows(self._head_state, 0, R, rows)
            self.heads.observe(hs, h, positions, self._lengths[:R], kv_len=Tb)
            write_back(self._head_state, hs, 0, R, rows)

    @property
    def observes(self) -> bool:
        """Whether run() also shows the prompts to the draft heads' state."""
        return self._head_state is not None

    def _replay(self, R: int, Tb: int) -> tuple[object, bool]:
        g = self.graphs.get((R, Tb))
        if g is not None:
            return g, False
        g = self.graphs[(R, Tb)] = capture(lambda: self._forward(R, Tb), warmup=1, pool=self.pool)
        self.captures += 1
        return g, True

    # -------------------------------------------------------------- use
    def prepare(self, R: int, Tb: int) -> bool:
        """Capture the bucket's graph ahead of traffic. Returns whether one was captured."""
        if not self.capture:
            return False
        with torch.inference_mode():
            return self._replay(R, Tb)[1]

    def run(self, tokens: torch.Tensor, cache: KVCache, lengths: torch.Tensor | None = None,
            head_state=None) -> torch.Tensor:
        """Prefill k fresh prompts (tokens [k, T], right-padded; lengths [k]), writing their K/V
        into slots 0 .. T-1 of `cache` (the k pool rows' view) and, when `observes`, the heads'
        state into `head_state` (the same rows' view). Returns the final hidden states [k, T, D]
        (a view of a buffer the next prefill overwrites)."""
        k, T = tokens.shape
        R, Tb = self.shape(k, T)
        tok, stage, hidden = self._views(R, Tb)
        tok[:k, :T].copy_(tokens)  # the rest holds earlier tokens: valid ids that only padding sees
        if self.observes:
            self._lengths[:k].copy_(lengths if lengths is not None else torch.full((k,), T))
        if self.capture:
            self._replay(R, Tb)[0]()
        else:
            self._forward(R, Tb)
        cache.kv[:, :, :, :, :T].copy_(stage.kv[:, :, :k, :, :T])
        if self.observes:
            copy_state_prefix(head_state, self._head_state, k, T, self.row_buckets[-1])
        return hidden[:k, :T]
