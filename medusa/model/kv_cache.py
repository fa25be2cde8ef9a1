"""Static, preallocated KV cache, written by slot so rejected speculative slots are simply
overwritten later. Knows nothing about trees: `commit_path` is a plain gather of slots."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa.model.config import ModelConfig


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, B, kv_heads, max_len, head_dim]
    v: torch.Tensor  # [layers, B, kv_heads, max_len, head_dim]

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values. slots [B, N] cache slots (a slot named twice in a row, such as
        a scratch slot, keeps one of its values); k, v [B, N, kv_heads, head_dim]. One scatter
        kernel each, with no index arithmetic per layer."""
        B, N, H, Dh = k.shape
        idx = slots[:, None, :, None].expand(B, H, N, Dh)  # [B, H, N, Dh] (a view)
        self.k[layer].scatter_(2, idx, k.transpose(1, 2))
        self.v[layer].scatter_(2, idx, v.transpose(1, 2))

    def commit_path(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move each row's accepted tree slots into place, for every layer at once.

        src, dst: [B, A] slot indices (dst = start + 0..A-1, src = start + accepted node ids).
        Rows may pad with src == dst (a no-op copy)."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]  # [B, 1]
        for t in (self.k, self.v):
            moved = t[:, rows, :, src]  # [L, B, A, H, Dh] (gathered copy)
            t[:, rows, :, dst] = moved

    def copy_row(self, src_row: int, dst_row: int, length: int) -> None:
        self.k[:, dst_row, :, :length] = self.k[:, src_row, :, :length]
        self.v[:, dst_row, :, :length] = self.v[:, src_row, :, :length]
