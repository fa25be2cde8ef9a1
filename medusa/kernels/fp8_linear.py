"""Weight-only FP8 GEMM for the decode step's few rows: y[M, N] = x[M, K] @ (W[N, K] e4m3 ->
x's dtype)^T * scale[N] (+ bias), accumulated in float32, one launch (two with split-K).

Why: a decode step multiplies 1 to ~80 rows per sequence by every weight, so it is bound by the
bytes of the weights read, and FP8 weights are half of bfloat16's. `torch._scaled_mm` needs the
activations in FP8 too (a per-row absmax, divide, clamp and cast: several kernels per projection)
and is tuned for large M; at decode sizes it measured slower than bfloat16 (issue 28). Here each
program converts its tile of FP8 weights to x's dtype in registers and multiplies by the
activations as they are (no activation rounding): every weight byte is read once.

Shape of the work: one program per BLOCK_N output columns and per K chunk. All M rows (up to
MAX_ROWS, padded to a power-of-two block of 16..64) are in one program, so the weights are not
read again per row block. Where N / BLOCK_N programs cannot fill the GPU (o_proj, down_proj, k/v
at N = 1024..4096) K is split: each chunk writes float32 partial sums, and a second small kernel
adds them, scales, adds the bias and casts (deterministic, no atomics, nothing to zero first).

Autotuning (BLOCK_K, warps, stages: a few configs) is keyed on the row block, N, K and the split,
and runs on a shape's first call, which must not be inside CUDA-graph capture (it times the
kernel); a call made while capturing takes a fixed default config for a shape not tuned yet,
so capture never tunes. Graph warm-up (eager runs before capture) tunes every captured shape.

The caller (medusa.model.fp8) decides when this runs: CUDA, compute capability 8.9+ (Triton's
e4m3 conversion), Triton installed, M <= MAX_ROWS."""
from __future__ import annotations

import os

import torch

from medusa.kernels import sm_count, triton_kernel

# The cut between this kernel and torch._scaled_mm: rows up to it fit one program's row block
# (16, 32 or 64 rows) next to a weight tile; above it the FP8 tensor-core GEMM (activations
# quantised per row) has enough rows to be compute-efficient, and re-reading weights per row
# block would start to cost.
MAX_ROWS = 64
BLOCK_N = 64  # output columns per program
MAX_SPLIT = 16  # K chunks at most
MIN_CHUNK = 256  # K columns per chunk at least (one BLOCK_K step of the widest config)
DEFAULT = dict(BLOCK_K=128, num_warps=4, num_stages=4)  # untuned shapes met during capture


def row_block(m: int) -> int:
    """The kernel's row block for m rows: 16, 32 or 64 (tl.dot needs at least 16)."""
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"the FP8 decode kernel takes 1..{MAX_ROWS} rows, not {m}")
    return 16 if m <= 16 else 32 if m <= 32 else 64


def split_k(m_block: int, n: int, k: int, sms: int) -> int:
    """K chunks for a [m_block, K] x [K, N] product: double until the programs cover the SMs
    twice, keeping chunks >= MIN_CHUNK columns and the float32 partial sums (m_block * N * 4
    bytes a chunk, written and read back) under a quarter of the weight bytes (N * K)."""
    n_blocks = -(-n // BLOCK_N)
    s = 1
    while (n_blocks * s < 2 * sms and s * 2 <= MAX_SPLIT and k // (s * 2) >= MIN_CHUNK
           and m_block * 4 * (s * 2) <= k // 4):
        s *= 2
    return s


@triton_kernel
def _kernels(triton, tl):
    @triton.jit
    def fp8_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm, stride_wn,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (column block pid_n, K chunk pid_k): acc[BLOCK_M, BLOCK_N] over the chunk.
        SPLIT_K == 1: y = acc * scale (+ bias) in y's dtype; else acc goes to ws[pid_k] (fp32)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # a whole number of BLOCK_K steps
        k0 = pid_k * chunk
        k_end = tl.minimum(k0 + chunk, K)
        m_ok = rm[:, None] < M
        n_ok = rn[None, :] < N
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None]  # [BLOCK_K, BLOCK_N], W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k0, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok, other=0.0)
                w = tl.load(w_ptrs, mask=n_ok, other=0.0)
            else:
                k_ok = (k + rk) < k_end
                x = tl.load(x_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok & k_ok[:, None], other=0.0)
            w = w.to(x_ptr.dtype.element_ty)
            if DOT_F32:  # Triton's interpreter multiplies 16-bit floats wrongly: the same products in float32
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(x, w)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SPLIT_K == 1:
            acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)
        else:
            tl.store(ws_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=m_ok & n_ok)

    @triton.jit
    def reduce_kernel(ws_ptr, s_ptr, b_ptr, y_ptr, MN, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK: tl.constexpr):
        """y[m, n] = sum over chunks of ws[chunk, m, n] * scale[n] (+ bias[n]), flat over M * N."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
        n = offs % N
        acc = acc * tl.load(s_ptr + n, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)

    # EVEN_K: every chunk is whole BLOCK_K steps, so the loads need no K mask (they vectorise)
    plain = triton.heuristics({"EVEN_K": lambda a: a["K"] % (a["SPLIT_K"] * a["BLOCK_K"]) == 0})(fp8_mm_kernel)
    configs = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bk, w, st in ((128, 4, 4), (256, 4, 3), (128, 8, 4), (256, 8, 3))]
    tuned = triton.autotune(configs, key=["BLOCK_M", "N", "K", "SPLIT_K"])(plain)
    return tuned, plain, reduce_kernel


_tuned_keys: set = set()  # (row block, N, K, split, x dtype, bias dtype) the autotuner has timed


# torch.compile (graphs.compile_blocks wraps the projections) leaves the launch to Python: the
# tuned-shape bookkeeping and the capture check are host logic, not traceable tensor code
@torch.compiler.disable
def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               tune: bool = True, split: int | None = None) -> torch.Tensor:
    """x [..., K] (bfloat16 or float16, at most MAX_ROWS rows), weight [N, K] float8 e4m3 with
    rows contiguous, scale [N] float32, bias [N] or None -> [..., N] in x's dtype.
    tune=False launches the default config (tests: the interpreter); split overrides the K
    chunks (tests), else `split_k` picks them for the device."""
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {K}")
    lead = x.shape[:-1]
    a = x.reshape(-1, K)
    if a.stride(-1) != 1:
        a = a.contiguous()
    M = a.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    if weight.stride(-1) != 1:
        raise ValueError("the FP8 weight's rows must be contiguous")
    tuned, plain, reduce_fn = _kernels()
    bm = row_block(M)
    s = split or (split_k(bm, N, K, sm_count(x.device)) if x.is_cuda else 1)
    ws = torch.empty(s, M, N, dtype=torch.float32, device=x.device) if s > 1 else y
    b = bias if bias is not None else scale  # any pointer: HAS_BIAS=False never reads it
    args = (a, weight, scale, b, y, ws, M, N, K, a.stride(0), weight.stride(0))
    meta = dict(HAS_BIAS=bias is not None, SPLIT_K=s, DOT_F32=os.environ.get("TRITON_INTERPRET") == "1", BLOCK_M=bm, BLOCK_N=BLOCK_N)
    grid = (triton_cdiv(N, BLOCK_N), s)
    # the autotuner's own key also holds the tensors' dtypes: the bias (or its stand-in) is one
    key = (bm, N, K, s, x.dtype, None if bias is None else bias.dtype)
    if tune and (key in _tuned_keys or not _capturing(x)):
        tuned[grid](*args, **meta)
        _tuned_keys.add(key)
    else:
        plain[grid](*args, **meta, **DEFAULT)
    if s > 1:
        block = 1024
        reduce_fn[(triton_cdiv(M * N, block),)](ws, scale, b, y, M * N, N, HAS_BIAS=bias is not None, SPLIT_K=s,
                                                 BLOCK=block, num_warps=4)
    return y.view(*lead, N)


def _capturing(x: torch.Tensor) -> bool:
    """Whether x's stream is recording a CUDA graph (nothing may be timed or synchronised)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
