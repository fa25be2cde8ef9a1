"""Top-k token ids for the draft heads' few rows.

The heads' top-k runs on 1 to ~16 rows of 32-49 k logits per tree level. torch.topk's
radix-select launches several kernels per call there (about 40 us on an H200, four calls per
Hydra++ step: scripts/gpu/step_ops_bench.py "draft"). Here one Triton program per row holds the
row in registers and takes its maximum k times (an argmax, then that column masked), so a call
is one kernel; the column -> token-id map of a draft vocabulary is applied in the same kernel.

Ties go to the lower column (torch.topk's order among ties is unspecified); a proposal's order
changes only which candidate a tree node holds, never the decoded output."""
from __future__ import annotations

import torch

from medusa.kernels import enabled, triton_kernel

# Rows of up to 32,768 values (a draft vocabulary) take the kernel: there it measured 21-31 us
# against torch.topk's 44-50 us at 1-11 rows (H200, bfloat16, step_ops_bench.py "draft"). A whole
# 49,152-token row (one program over 65,536 slots) was slower than torch.topk at 1-4 rows (74
# against 58-60 us), so heads without a draft vocabulary keep torch.topk.
MAX_COLUMNS = 32768
MAX_K = 64


@triton_kernel
def _kernel(triton, tl):
    """The Triton kernel (built on first use; None where Triton is missing)."""

    @triton.jit
    def topk_rows(x_ptr, ids_ptr, out_ptr, n_cols, stride_x, K: tl.constexpr, BLOCK: tl.constexpr,
                  MAP: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        for j in tl.static_range(K):
            at = tl.minimum(tl.argmax(x, axis=0), n_cols - 1)
            if MAP:
                tok = tl.load(ids_ptr + at).to(tl.int64)
            else:
                tok = at.to(tl.int64)
            tl.store(out_ptr + row * K + j, tok)
            x = tl.where(cols == at, float("-inf"), x)

    return topk_rows, triton.next_power_of_2


def _use_kernel(x: torch.Tensor, k: int) -> bool:
    return (enabled(x.device) and not x.requires_grad and 1 <= k <= min(MAX_K, x.shape[-1])
            and x.shape[-1] <= MAX_COLUMNS)


def topk_ids(x: torch.Tensor, k: int, ids: torch.Tensor | None = None, kernel: bool | None = None) -> torch.Tensor:
    """The columns of the k largest values of x [..., F], best first, as token ids: ids [F]
    maps column -> token (None: the column is the token). -> [..., k] long.
    kernel: None picks the Triton kernel where it runs (CUDA, Triton present), True forces it
    (tests: Triton's interpreter runs it on CPU tensors), False forces torch.topk."""
    use = _use_kernel(x, k) if kernel is None else kernel
    if not use:
        top = x.topk(k, dim=-1).indices
        return ids[top] if ids is not None else top
    fn, next_pow2 = _kernel()
    lead, F = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, F)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    if rows.shape[0]:
        block = next_pow2(F)
        fn[(rows.shape[0],)](rows, ids if ids is not None else rows, out, F, rows.stride(0), K=k, BLOCK=block,
                             MAP=ids is not None, num_warps=max(4, min(32, block // 2048)))
    return out.view(*lead, k)
