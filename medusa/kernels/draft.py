"""Small fused pieces of the Hydra heads' draft, one launch each where torch takes two or three.

A Hydra++ step drafts one tree level at a time, and each level is a chain of tiny kernels on
one to a dozen rows (the decode step is launch-bound on a GPU). Two of its links fuse simply:

- `head_inputs`: a head's input [s; e(x_1); ...; e(x_d)] for every parent node of the level,
  gathered straight from the candidates and the embedding table: one kernel instead of the
  index of the path tokens, the embedding lookup and the concatenation with s.
- `add_silu`: res + SiLU(y), the residual of every head layer: one kernel instead of two.

Each falls back to the same torch expression on CPUs, without Triton, with MEDUSA_KERNELS=torch
or when gradients flow (head training), so the heads compute one function everywhere. This module
knows nothing of trees or acceptance: `chains` is just a table of candidate columns."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medusa.kernels import enabled, triton_kernel


@triton_kernel
def _kernels(triton, tl):
    @triton.jit
    def head_inputs_kernel(s_ptr, cand_ptr, chains_ptr, w_ptr, out_ptr, P, N, D, stride_s, stride_w,
                           C: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row b * P + p, segment j): segment 0 is s[b], segment j the embedding of the
        candidate at column chains[p, j - 1] of row b."""
        r = tl.program_id(0)
        seg = tl.program_id(1)
        b = r // P
        cols = tl.arange(0, BLOCK)
        m = cols < D
        if seg == 0:
            v = tl.load(s_ptr + b * stride_s + cols, mask=m)
        else:
            node = tl.load(chains_ptr + (r % P) * (C - 1) + seg - 1)
            tok = tl.load(cand_ptr + b * N + node)
            v = tl.load(w_ptr + tok * stride_w + cols, mask=m)
        tl.store(out_ptr + (r * C + seg) * D + cols, v.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def add_silu_kernel(res_ptr, y_ptr, out_ptr, P, D, stride_ra, stride_rp, BLOCK: tl.constexpr):
        """Program per row r of y [R, D]: res row (r // P, r % P) + SiLU(y row), in float32."""
        r = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        y = tl.load(y_ptr + r * D + cols, mask=m).to(tl.float32)
        res = tl.load(res_ptr + (r // P) * stride_ra + (r % P) * stride_rp + cols, mask=m).to(tl.float32)
        out = res + y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + r * D + cols, out.to(out_ptr.dtype.element_ty), mask=m)

    return head_inputs_kernel, add_silu_kernel, triton.next_power_of_2


def _use(*ts: torch.Tensor, kernel: bool | None) -> bool:
    if kernel is not None:
        return kernel
    return enabled(ts[0].device) and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def head_inputs(s: torch.Tensor, cand: torch.Tensor, chains: torch.Tensor, weight: torch.Tensor,
                kernel: bool | None = None) -> torch.Tensor:
    """s [B, D] (each row's summary), cand [B, N] candidate token ids, chains [P, d] candidate
    columns of each parent's path, weight [V, D] the embedding table
    -> [B, P, (d + 1) D] = [s[b]; weight[cand[b, chains[p, 0]]]; ...], in weight's dtype.
    kernel: None picks the Triton kernel where it runs, True forces it (tests: the interpreter)."""
    B, D = s.shape
    P, d = chains.shape
    if not _use(s, weight, kernel=kernel):
        embeds = F.embedding(cand[:, chains], weight)  # [B, P, d, D]
        return torch.cat([s[:, None].expand(B, P, D).to(weight.dtype), embeds.flatten(-2)], dim=-1)
    head_fn, _, next_pow2 = _kernels()
    s = s.to(weight.dtype)  # no copy when the summaries are in the table's dtype already (the heads' case)
    s = s if s.stride(-1) == 1 else s.contiguous()
    out = torch.empty(B, P, (d + 1) * D, dtype=weight.dtype, device=s.device)
    if B and P:
        head_fn[(B * P, d + 1)](s, cand.contiguous(), chains.contiguous(), weight, out, P, cand.shape[1], D,
                                s.stride(0), weight.stride(0), C=d + 1, BLOCK=next_pow2(D), num_warps=4)
    return out


def add_silu(res: torch.Tensor, y: torch.Tensor, kernel: bool | None = None) -> torch.Tensor:
    """res + SiLU(y), res broadcast to y's shape [..., D] (a head layer's residual: s may be one
    row per batch row, shared by its P parents) -> y's shape and dtype."""
    if not _use(res, y, kernel=kernel) or y.dim() < 2:
        return res + F.silu(y)
    _, add_fn, next_pow2 = _kernels()
    D = y.shape[-1]
    y2 = y.reshape(-1, D) if y.is_contiguous() else y.contiguous().reshape(-1, D)
    r3 = res.expand_as(y).reshape(-1, y.shape[-2], D) if y.dim() > 2 else res.expand_as(y)[None]  # [A, P, D] view when it can be
    if r3.stride(-1) != 1:
        r3 = r3.contiguous()
    out = torch.empty_like(y2)
    if y2.shape[0]:
        add_fn[(y2.shape[0],)](r3, y2, out, r3.shape[1], D, r3.stride(0), r3.stride(1), BLOCK=next_pow2(D), num_warps=4)
    return out.view(y.shape)
