"""Attention of a decode step in one kernel: queries at tree nodes (or one token) against the KV
cache under a per-row visibility mask, with grouped-query heads.

The step's current attention (medusa.model.llama: `attend_matmul` or SDPA) runs at least five
kernels per layer at the step's shapes: a copy that folds the query heads into rows, the score
GEMM, the mask, the softmax and the value GEMM, plus a copy back to the [token, head] layout
when a step has more than one token. This kernel reads the queries and writes the output in
their own [B, N, H, Dh] layout and keeps the scores on chip (online softmax, float32), so a
layer's attention is one launch. One program takes BLOCK_M folded query rows of one (row, kv
head) and walks the visible cache slots in blocks of BLOCK_N.

Numerics follow `attend_matmul`: float32 scores and softmax; the probabilities are rounded to the
values' dtype before the value product (float32 inputs use IEEE float32 products, not TF32).
The queries come pre-scaled (`Attention.inputs`)."""
from __future__ import annotations

import torch

from medusa.kernels import triton_kernel


@triton_kernel
def _kernel(triton, tl):
    """The Triton kernel (built on first use; None where Triton is missing)."""

    @triton.jit
    def tree_attention_fwd(q_ptr, k_ptr, v_ptr, vis_ptr, out_ptr,
                           sq_b, sq_n, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_n, so_b, so_n, so_h,
                           N, S, HKV,
                           REP: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           IEEE: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = pid_bh // HKV
        hkv = pid_bh % HKV
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded query rows: head r of this kv head, token n
        row_ok = m < REP * N
        n = m % N
        h = hkv * REP + m // N
        d = tl.arange(0, DH)
        q = tl.load(q_ptr + b * sq_b + n[:, None] * sq_n + h[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DH], tl.float32)
        for start in range(0, S, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)
            s_ok = s < S
            k = tl.load(k_ptr + b * sk_b + hkv * sk_h + s[None, :] * sk_s + d[:, None], mask=s_ok[None, :], other=0.0)
            if IEEE:
                scores = tl.dot(q, k, input_precision="ieee")
            else:
                scores = tl.dot(q, k)
            vis = tl.load(vis_ptr + b * sm_b + n[:, None] * sm_n + s[None, :], mask=row_ok[:, None] & s_ok[None, :], other=0)
            scores = tl.where(vis != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * sv_b + hkv * sv_h + s[:, None] * sv_s + d[None, :], mask=s_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + b * so_b + n[:, None] * so_n + h[:, None] * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    return tree_attention_fwd


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """q [B, N, H, Dh] (pre-scaled; any strides with a unit last one), k and v [B, Hkv, S, Dh]
    (cache views), visible [B, N, S] bool (may token n see slot s; each sees at least one)
    -> [B, N, H, Dh] contiguous, in q's dtype: softmax(q k^T) v per head, head h reading kv
    head h // (H / Hkv)."""
    B, N, H, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    if Dh < 16 or Dh & (Dh - 1):
        raise ValueError(f"tree_attention takes a power-of-two head dim >= 16, not {Dh}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("tree_attention needs a unit stride along the head dim")
    if visible.stride(-1) != 1:
        visible = visible.contiguous()
    out = torch.empty(B, N, H, Dh, dtype=q.dtype, device=q.device)
    rows = rep * N
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    grid = (B * Hkv, -(-rows // block_m))
    _kernel()[grid](q, k, v, visible, out,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), visible.stride(0), visible.stride(1),
                    out.stride(0), out.stride(1), out.stride(2), N, S, Hkv,
                    REP=rep, DH=Dh, BLOCK_M=block_m, BLOCK_N=64, IEEE=q.dtype == torch.float32, num_warps=4)
    return out
