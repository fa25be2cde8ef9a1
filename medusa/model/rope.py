"""Rotary position embeddings (half-rotation layout, as HF Llama), with the `linear` and
`llama3` frequency scalings. Pure functions of the config; no module state."""
from __future__ import annotations

import math

import torch

from medusa.errors import ModelLoadError


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] float64 inverse frequencies, scaled as the config asks."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        return torch.where(is_mid, mid, out)
    raise ModelLoadError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


def rope_table(max_pos: int, head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables [max_pos, head_dim] in float32. The rotation's sign is folded
    into the sine (its first half negated), so `apply_rope` needs no negation kernel."""
    inv = inv_frequencies(head_dim, theta, scaling)
    t = torch.arange(max_pos, dtype=torch.float64)
    freqs = torch.outer(t, inv)  # [P, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, Dh]
    sin = emb.sin()
    sin[:, : head_dim // 2] *= -1
    return emb.cos().float(), sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., Dh] (any layout, e.g. [B, N, heads, Dh]); cos and signed sin broadcastable to it,
    in x's dtype. HF's x * cos + rotate_half(x) * sin in three kernels: rotate_half(x) is the
    swapped halves of x times the sign folded into `sin`."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)
