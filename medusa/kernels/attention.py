"""Attention of a decode step in one kernel: queries at tree nodes (or one token) against the KV
cache under a per-row visibility mask, with grouped-query heads.

The step's torch attention (medusa.model.llama: `attend_matmul` or SDPA) runs at least five
kernels per layer at the step's shapes: a copy that folds the query heads into rows, the score
GEMM, the mask, the softmax and the value GEMM, plus a copy back to the [token, head] layout
when a step has more than one token. This kernel reads the queries and writes the output in
their own [B, N, H, Dh] layout and keeps the scores on chip (online softmax, float32), so a
layer's attention is one launch. One program takes BLOCK_M folded query rows of one (row, kv
head) and walks its share of the visible cache slots in blocks of BLOCK_N.

Split KV: with few programs (batch 1-4, a handful of query rows: 3-36 programs on an H200's 132
SMs) one program walking a long span alone is the bottleneck (55.8 us at batch 1 and 4,096
slots, against the GEMMs' 17.3). Then the span is cut into `kv_splits` parts, one program each,
which write their unnormalised partial outputs and softmax statistics (max, sum) to a float32
workspace, and a second small kernel rescales and sums the parts: two launches instead of one,
spread over the GPU (8.6 us there; 1.4x-6.5x faster than one part at the 24 split shapes of
scripts/gpu/attention_bench.py).

Numerics follow `attend_matmul`: float32 scores and softmax; the probabilities are rounded to the
values' dtype before the value product (float32 inputs use IEEE float32 products, not TF32).
The queries come pre-scaled (`Attention.inputs`)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from medusa.kernels import sm_count, triton_kernel

BLOCK_N = 64  # cache slots per inner step
MIN_SPLIT = 256  # a split walks at least this many slots (4 blocks): shorter parts cost more to combine than they save
MAX_SPLITS = 16


def takes_head_dim(head_dim: int) -> bool:
    """Whether the kernel takes this head dim (a power of two, at least 16: tl.dot's tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def block_rows(rows: int) -> int:
    """Folded query rows per program (tl.dot takes at least 16)."""
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)


def kv_splits(programs: int, kv_len: int, sms: int) -> int:
    """Parts the KV span is cut into (a power of two): doubled while the programs fill fewer
    than the GPU's SMs and every part keeps at least MIN_SPLIT slots."""
    splits = 1
    while splits < MAX_SPLITS and programs * splits < sms and kv_len >= 2 * splits * MIN_SPLIT:
        splits *= 2
    return splits


class LaunchPlan(NamedTuple):
    """How a call is laid out: what tree_attention launches and medusa.model.llama's cost model
    prices."""

    block_m: int  # folded query rows per program
    m_blocks: int  # programs per (row, kv head) along the folded rows
    splits: int  # parts of the KV span, one program each
    part: int  # slots per part (a multiple of BLOCK_N; the last part may hold fewer)

    def programs(self, batch: int, kv_heads: int) -> int:
        return batch * kv_heads * self.m_blocks * self.splits


def launch_plan(batch: int, kv_heads: int, rows: int, kv_len: int, sms: int | None,
                splits: int | None = None) -> LaunchPlan:
    """The plan for [batch, kv_heads, rows] folded query rows over kv_len slots; splits given, or
    `kv_splits` on a GPU of `sms` SMs, or 1 (sms None: not a GPU)."""
    block_m = block_rows(rows)
    m_blocks = -(-rows // block_m)
    if splits is None:
        splits = 1 if sms is None else kv_splits(batch * kv_heads * m_blocks, kv_len, sms)
    return LaunchPlan(block_m, m_blocks, splits, -(-kv_len // (splits * BLOCK_N)) * BLOCK_N)


@triton_kernel
def _kernels(triton, tl):
    """The Triton kernels (built on first use; None where Triton is missing): the attention
    (whole, or one part of a split span) and the combination of the parts."""

    @triton.jit
    def tree_attention_fwd(q_ptr, k_ptr, v_ptr, vis_ptr, out_ptr, part_ptr, stat_ptr,
                           sq_b, sq_n, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_n, so_b, so_n, so_h,
                           N, S, HKV, CHUNK,
                           REP: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           SPLITS: tl.constexpr, IEEE: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
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
        s_begin = split * CHUNK
        s_end = tl.minimum(S, s_begin + CHUNK)
        for offset in range(0, CHUNK, BLOCK_N):  # scalar bounds (the interpreter needs them too)
            s = s_begin + offset + tl.arange(0, BLOCK_N)
            s_ok = s < s_end
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
        if SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + b * so_b + n[:, None] * so_n + h[:, None] * so_h + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # this part's unnormalised output and its max and sum, row-major [B * HKV, SPLITS, rows, ...]
            at = (pid_bh * SPLITS + split) * (tl.num_programs(1) * BLOCK_M) + m
            tl.store(part_ptr + at[:, None] * DH + d[None, :], acc)
            tl.store(stat_ptr + at * 2, m_i)
            tl.store(stat_ptr + at * 2 + 1, l_i)

    @triton.jit
    def tree_attention_combine(part_ptr, stat_ptr, out_ptr, so_b, so_n, so_h, N, HKV,
                               REP: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = pid_bh // HKV
        hkv = pid_bh % HKV
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < REP * N
        n = m % N
        h = hkv * REP + m // N
        d = tl.arange(0, DH)
        rows = tl.num_programs(1) * BLOCK_M
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for j in tl.static_range(SPLITS):
            top = tl.maximum(top, tl.load(stat_ptr + ((pid_bh * SPLITS + j) * rows + m) * 2))
        top = tl.where(top == float("-inf"), 0.0, top)
        l_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DH], tl.float32)
        for j in tl.static_range(SPLITS):
            at = (pid_bh * SPLITS + j) * rows + m
            w = tl.exp(tl.load(stat_ptr + at * 2) - top)  # a part that saw nothing: exp(-inf) = 0
            l_sum += w * tl.load(stat_ptr + at * 2 + 1)
            acc += w[:, None] * tl.load(part_ptr + at[:, None] * DH + d[None, :])
        out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
        tl.store(out_ptr + b * so_b + n[:, None] * so_n + h[:, None] * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    return tree_attention_fwd, tree_attention_combine


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                   splits: int | None = None) -> torch.Tensor:
    """q [B, N, H, Dh] (pre-scaled; any strides with a unit last one), k and v [B, Hkv, S, Dh]
    (cache views), visible [B, N, S] bool (may token n see slot s; each sees at least one)
    -> [B, N, H, Dh] contiguous, in q's dtype: softmax(q k^T) v per head, head h reading kv
    head h // (H / Hkv). splits: parts of the KV span (default: `kv_splits` for this GPU; 1 on
    other devices)."""
    B, N, H, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    if not takes_head_dim(Dh):
        raise ValueError(f"tree_attention takes a power-of-two head dim >= 16, not {Dh}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("tree_attention needs a unit stride along the head dim")
    if visible.stride(-1) != 1:
        visible = visible.contiguous()
    out = torch.empty(B, N, H, Dh, dtype=q.dtype, device=q.device)
    plan = launch_plan(B, Hkv, rep * N, S, sm_count(q.device) if q.is_cuda else None, splits)
    block_m, m_blocks, splits = plan.block_m, plan.m_blocks, plan.splits
    if splits > 1:
        part = torch.empty(B * Hkv * splits * m_blocks * block_m * Dh, dtype=torch.float32, device=q.device)
        stat = torch.empty(B * Hkv * splits * m_blocks * block_m * 2, dtype=torch.float32, device=q.device)
    else:
        part = stat = out  # not read
    attend, combine = _kernels()
    attend[(B * Hkv, m_blocks, splits)](
        q, k, v, visible, out, part, stat,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), visible.stride(0), visible.stride(1),
        out.stride(0), out.stride(1), out.stride(2), N, S, Hkv, plan.part,
        REP=rep, DH=Dh, BLOCK_M=block_m, BLOCK_N=BLOCK_N, SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=4)
    if splits > 1:
        combine[(B * Hkv, m_blocks)](part, stat, out, out.stride(0), out.stride(1), out.stride(2), N, Hkv,
                                     REP=rep, DH=Dh, BLOCK_M=block_m, SPLITS=splits, num_warps=4)
    return out
