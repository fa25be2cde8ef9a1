"""Top-k token ids for the draft heads' few rows.

The heads' top-k runs on 1 to ~16 rows of 32-49 k logits per tree level. torch.topk's
radix-select launches several kernels per call there (about 40 us on an H200, four calls per
Hydra++ step: scripts/gpu/step_ops_bench.py "draft"). Here a Triton program holds a row, or a
CHUNK-wide piece of it, in registers and takes its maximum k times (an argmax, then that column
masked); for split rows a second kernel takes the k best of the pieces' candidates. The column ->
token-id map of a draft vocabulary is applied in the last kernel.

Ties go to the lower column (torch.topk's order among ties is unspecified); a proposal's order
changes only which candidate a tree node holds, never the decoded output."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from medusa.errors import ModelLoadError
from medusa.kernels import enabled, triton_kernel

# One program per row walks the whole row K times: at 32,768 columns that beat torch.topk (21-31
# against 44-50 us), but a row of 49,152 (65,536 slots) ran slower than torch.topk. Long rows now
# split: each program takes the top K of one CHUNK-wide piece, and a second kernel merges the
# pieces' candidates per row, so whole-vocabulary heads take the kernel too.
MAX_COLUMNS = 65536
MAX_K = 64
WHOLE_ROW_COLUMNS = 32768  # above this, a row in one program is slower than torch.topk


def chunk_setting(raw: str) -> int:
    """MEDUSA_TOPK_CHUNK: the pieces' width, a power of two >= 16 (default 1024); 0 keeps one
    program per row (for side-by-side measurements). ValueError for anything else."""
    if not raw.isdigit() or (int(raw) and int(raw) & (int(raw) - 1)) or 0 < int(raw) < 16:
        raise ValueError(f"MEDUSA_TOPK_CHUNK must be 0 or a power of two >= 16, got {raw!r}")
    return int(raw)


# read once at import, like MEDUSA_ATTENTION (medusa.model.llama); the check reports a bad value
CHUNK_SETTING = os.environ.get("MEDUSA_TOPK_CHUNK", "1024")


def check_topk_setting() -> None:
    """Raise a user-facing error for a bad MEDUSA_TOPK_CHUNK (checked when a model loads)."""
    try:
        chunk_setting(CHUNK_SETTING)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


try:
    CHUNK = chunk_setting(CHUNK_SETTING)
except ValueError:  # reported by check_topk_setting when a model loads
    CHUNK = 1024
# H200, bfloat16, 1-11 rows (step_ops_bench.py "draft", results/step-ops-bench-split-topk-h200.json):
# split in 1,024-wide pieces, a row of 49,152 took 27-32 us (one program: 46-76, torch.topk: 59-65),
# 32,768 16-20 (one program: 20-31) and 16,384 13-17 (13-19); at 4,096-8,192 columns one program
# was 1-2 us faster, so rows up to SPLIT_ABOVE columns stay whole
SPLIT_ABOVE = 8192


@triton_kernel
def _kernel(triton, tl):
    """The Triton kernels (built on first use; None where Triton is missing): one program per
    row, and the two stages of the split version."""

    @triton.jit
    def topk_rows(x_ptr, ids_ptr, out_ptr, dest_ptr, P, N, n_cols, stride_x, K: tl.constexpr, BLOCK: tl.constexpr,
                  MAP: tl.constexpr, INTO: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        for j in tl.static_range(K):
            at = tl.minimum(tl.argmax(x, axis=0), n_cols - 1)
            if MAP:
                tok = tl.load(ids_ptr + at).to(tl.int64)
            else:
                tok = at.to(tl.int64)
            if INTO:  # at column dest[row % P, j] of row row // P of an [R / P, N] table (dest < 0: dropped);
                # written out in both kernels: Tritons before mid-2025 (triton-lang/triton#7105), which torch>=2.4
                # may bring, look only in module globals, so they would not find a jit helper defined in this builder
                node = tl.load(dest_ptr + (row % P) * K + j)
                tl.store(out_ptr + (row // P) * N + node, tok, mask=node >= 0)
            else:
                tl.store(out_ptr + row * K + j, tok)
            x = tl.where(cols == at, float("-inf"), x)

    @triton.jit
    def topk_pieces(x_ptr, val_ptr, col_ptr, n_cols, stride_x, n_pieces, K: tl.constexpr, CHUNK: tl.constexpr):
        """Stage 1, program (row, piece): the K largest of one piece, best first (ties: lower column)."""
        row = tl.program_id(0)
        piece = tl.program_id(1)
        i = tl.arange(0, CHUNK)
        cols = piece * CHUNK + i
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        out = (row * n_pieces + piece) * K
        for j in tl.static_range(K):
            at = tl.argmax(x, axis=0)
            tl.store(val_ptr + out + j, tl.max(x, axis=0))
            tl.store(col_ptr + out + j, tl.minimum(piece * CHUNK + at, n_cols - 1))
            x = tl.where(i == at, float("-inf"), x)

    @triton.jit
    def topk_merge(val_ptr, col_ptr, ids_ptr, out_ptr, dest_ptr, P, N, n_cand, K: tl.constexpr, BLOCK: tl.constexpr,
                   MAP: tl.constexpr, INTO: tl.constexpr):
        """Stage 2, one program per row: the K largest of the pieces' candidates. Candidates lie in
        column order among equal values (pieces in order, each best first with ties to the lower
        column), so the first maximum is the lowest column, as in the one-program kernel."""
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        v = tl.load(val_ptr + row * n_cand + i, mask=i < n_cand, other=float("-inf"))
        c = tl.load(col_ptr + row * n_cand + i, mask=i < n_cand, other=0)
        for j in tl.static_range(K):
            at = tl.argmax(v, axis=0)
            col = tl.sum(tl.where(i == at, c, 0), axis=0)
            if MAP:
                tok = tl.load(ids_ptr + col).to(tl.int64)
            else:
                tok = col.to(tl.int64)
            if INTO:  # at column dest[row % P, j] of row row // P of an [R / P, N] table (dest < 0: dropped)
                node = tl.load(dest_ptr + (row % P) * K + j)
                tl.store(out_ptr + (row // P) * N + node, tok, mask=node >= 0)
            else:
                tl.store(out_ptr + row * K + j, tok)
            v = tl.where(i == at, float("-inf"), v)

    return topk_rows, topk_pieces, topk_merge, triton.next_power_of_2


def _use_kernel(x: torch.Tensor, k: int) -> bool:
    F = x.shape[-1]
    return (enabled(x.device) and not x.requires_grad and 1 <= k <= min(MAX_K, F) and F <= MAX_COLUMNS
            and (F <= WHOLE_ROW_COLUMNS or split_plan(F)[0] > 1))


def split_plan(n_cols: int, chunk: int | None = None) -> tuple[int, int]:
    """(pieces, width) for a row of n_cols: how many pieces the split kernel cuts it into, and
    their width; (1, n_cols) runs the row whole in one program. chunk None: CHUNK-wide pieces
    for rows longer than SPLIT_ABOVE; 0: never split; a power of two: split rows longer than it."""
    if chunk is None:
        chunk = CHUNK if n_cols > SPLIT_ABOVE else 0
    if not chunk or n_cols <= chunk:
        return 1, n_cols
    return -(-n_cols // chunk), chunk


class Into(NamedTuple):
    """Where topk_ids(into=...) writes each row's guesses: table[b, dest[p, j]] gets the j-th best
    of x[b, p] (dest < 0: dropped). nodes [C] and picks [C] say the same as flat lists (table
    column, index into the [P * k] guesses), for torch's gather and scatter, which could not
    drop the negative entries without a host sync (none may happen inside a CUDA graph)."""

    table: torch.Tensor  # [B, N] long, contiguous
    dest: torch.Tensor  # [P, k] long
    nodes: torch.Tensor  # [C] long
    picks: torch.Tensor  # [C] long


def into_plan(dest: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dest, nodes, picks) tensors of an Into from dest as nested lists (-1: none)."""
    flat = [(c, i) for i, c in enumerate(x for row in dest for x in row) if c >= 0]
    t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return t(dest), t([c for c, _ in flat]), t([i for _, i in flat])


def topk_ids(x: torch.Tensor, k: int, ids: torch.Tensor | None = None, kernel: bool | None = None,
             chunk: int | None = None, into: Into | None = None) -> torch.Tensor:
    """The columns of the k largest values of x [..., F], best first, as token ids: ids [F]
    maps column -> token (None: the column is the token). -> [..., k] long.
    kernel: None picks the Triton kernel where it runs (CUDA, Triton present), True forces it
    (tests: Triton's interpreter runs it on CPU tensors), False forces torch.topk.
    chunk: the kernel's split (split_plan): None as measured, 0 one program per row, a power of
    two: rows longer than it split into pieces that wide.
    into: Into(table [B, N] long, dest [P, k] long, ...) with x [B, P, F]: write the j-th best of
    x[b, p] into table[b, dest[p, j]] instead (skipping negative dest), and return the table; the
    kernel stores there directly (a draft level's proposals land in the candidates with no gather
    and scatter after it)."""
    use = _use_kernel(x, k) if kernel is None else kernel
    if into is not None:
        table, dest = into.table, into.dest
        if x.dim() != 3 or dest.shape != (x.shape[1], k) or table.shape[0] != x.shape[0] or not table.is_contiguous():
            raise ValueError("into: x [B, P, F], dest [P, k] and a contiguous table [B, N]")
    if not use:
        top = x.topk(k, dim=-1).indices
        top = ids[top] if ids is not None else top
        if into is None:
            return top
        table[:, into.nodes] = top.flatten(1)[:, into.picks]
        return table
    rows_fn, pieces_fn, merge_fn, next_pow2 = _kernel()
    lead, F = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, F)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    R = rows.shape[0]
    if into is None:
        out, dest, P, N = torch.empty(R, k, dtype=torch.long, device=x.device), None, 1, k
    else:
        out, dest, P, N = table, dest.contiguous(), x.shape[1], table.shape[1]
    target = dict(dest_ptr=dest if dest is not None else out, P=P, N=N, INTO=dest is not None)
    n, width = split_plan(F, chunk)
    if R and n == 1:
        block = next_pow2(F)
        rows_fn[(R,)](rows, ids if ids is not None else rows, out, n_cols=F, stride_x=rows.stride(0), K=k, BLOCK=block,
                      MAP=ids is not None, num_warps=max(4, min(32, block // 2048)), **target)
    elif R:
        vals = torch.empty(R, n, k, dtype=torch.float32, device=x.device)
        cols = torch.empty(R, n, k, dtype=torch.int32, device=x.device)
        pieces_fn[(R, n)](rows, vals, cols, F, rows.stride(0), n, K=k, CHUNK=width, num_warps=4)
        block = next_pow2(n * k)
        merge_fn[(R,)](vals, cols, ids if ids is not None else cols, out, n_cand=n * k, K=k, BLOCK=block,
                       MAP=ids is not None, num_warps=max(4, min(16, block // 512)), **target)
    return out if into is not None else out.view(*lead, k)
