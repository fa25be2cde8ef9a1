"""Static, preallocated KV cache, written by slot so rejected speculative slots are simply
overwritten later. Knows nothing about trees: `commit_path` is a plain gather of slots.

Keys and values live in one tensor, so that a layer's new K and V are one write (one kernel
instead of two: the write of a 64-node tree step measured 7.8 -> 3.4 us per layer on an H200,
scripts/gpu/step_ops_bench.py) and a path commit is one gather and one write for both."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa.model.config import ModelConfig


@dataclass
class KVCache:
    kv: torch.Tensor  # [layers, 2, B, kv_heads, max_len, head_dim]: keys at [:, 0], values at [:, 1]

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.num_layers, 2, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def k(self) -> torch.Tensor:  # [layers, B, kv_heads, max_len, head_dim] (a view)
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A view of rows lo .. hi-1 (writes land in this cache)."""
        return KVCache(self.kv[:, :, lo:hi])

    # per-row state (medusa.decoding.kv_pool.PerRow): a cache's rows are its batch dimension
    def swap_rows(self, a: int, b: int, len_a: int | None = None, len_b: int | None = None) -> None:
        """Exchange rows a and b (only their first len_a / len_b slots when given: the valid ones)."""
        t = self.kv
        if len_a is None or len_b is None:
            t[:, :, [a, b]] = t[:, :, [b, a]]
            return
        tmp = t[:, :, a, :, :len_a].clone()  # [L, 2, H, len_a, Dh]
        t[:, :, a, :, :len_b] = t[:, :, b, :, :len_b]
        t[:, :, b, :, :len_a] = tmp

    def scratch(self) -> "KVCache":
        """A trial step's copy: the cache itself (steps write only past the committed slots)."""
        return self

    def write_back(self, view: "KVCache", lo: int, hi: int) -> None:
        """Copy rows lo .. hi-1 back from `view` unless it is a view of them already."""
        if view.kv.data_ptr() != self.kv[:, :, lo:hi].data_ptr():
            self.kv[:, :, lo:hi] = view.kv

    def copy_prefix(self, src: "KVCache", k: int, T: int) -> None:
        """Rows 0 .. k-1 of src, their first T slots, into rows 0 .. k-1 of this cache."""
        self.kv[:, :, :k, :, :T].copy_(src.kv[:, :, :k, :, :T])

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store new keys and values in one write. rows [B, 1] (0 .. B-1), slots [B, N] cache
        slots (a slot named twice in a row, such as a scratch slot, keeps one of its values);
        kv [B, N, 2 * kv_heads, head_dim]: the keys' heads, then the values'."""
        B, N, _, Dh = kv.shape
        dst = self.kv[layer].permute(1, 3, 0, 2, 4)  # [B, max_len, 2, kv_heads, Dh] (a view)
        dst.index_put_((rows, slots), kv.view(B, N, 2, -1, Dh))

    def commit_path(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move each row's accepted tree slots into place, for every layer at once.

        src, dst: [B, A] slot indices (dst = start + 0..A-1, src = start + accepted node ids).
        Rows may pad with src == dst (a no-op copy)."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]  # [B, 1]
        t = self.kv.permute(2, 4, 0, 1, 3, 5)  # [B, max_len, L, 2, H, Dh] (a view)
        t[rows, dst] = t[rows, src]  # the right side is a gathered copy

