"""The accepted path of a verification step in one kernel, for the rules that compare each
candidate with one target token drawn at its parent (greedy and sample; typical acceptance keeps
the torch path).

`medusa.decoding.verify` finds the path in about twenty small torch kernels (the match of every
node, its gather along the tree's root-to-leaf paths, the running product, the longest path, and
the gathers of the path's tokens and bonus); at the step's sizes (a few dozen nodes, paths of at
most five) each one is a launch of a few microseconds, in plain steps too. Here one program per
row does all of it, reading the candidates and targets through the tree's tables.

A dynamic tree (medusa.decoding.dynamic_tree) gives every row its own parent and retrieve
tables: the program of row b reads them at b's offset (strides 0 for a static tree's shared ones).

The result is verify's exactly (the first longest path, as its argmax picks). This module knows
nothing of models or caches: it is a function of token ids and the tree's index tables."""
from __future__ import annotations

import torch

from medusa.kernels import triton_kernel


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def accept_rows(target_ptr, cand_ptr, parent_ptr, retrieve_ptr, cap_ptr, path_ptr, length_ptr, tokens_ptr, last_ptr,
                    N, P, D1, parent_stride, retrieve_stride,
                    HAS_CAP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        parent_ptr = parent_ptr + b * parent_stride  # a row's own tables (dynamic trees), or the shared ones (stride 0)
        retrieve_ptr = retrieve_ptr + b * retrieve_stride
        p = tl.arange(0, BLOCK_P)[:, None]  # [BP, 1] path
        d = tl.arange(0, BLOCK_D)[None, :]  # [1, BD] depth along the path
        inside = (p < P) & (d < D1)
        node = tl.load(retrieve_ptr + p * D1 + d, mask=inside, other=-1)  # [BP, BD], -1 past a path's end
        real = node >= 0
        safe = tl.where(real, node, 0)
        par = tl.load(parent_ptr + safe, mask=real, other=0)
        ok = tl.load(cand_ptr + b * N + safe, mask=real, other=-1) == tl.load(target_ptr + b * N + par, mask=real, other=-2)
        ok = (ok & real) | (d == 0)
        # accepted candidates of a path: the depths before its first mismatch (the root always holds)
        first_bad = tl.min(tl.where(ok | (d >= D1), BLOCK_D + 1, d), axis=1)  # [BP]
        lengths = tl.minimum(first_bad, D1) - 1
        if HAS_CAP:
            lengths = tl.minimum(lengths, tl.load(cap_ptr + b))
        pv = tl.arange(0, BLOCK_P)
        lengths = tl.where(pv < P, lengths, -1)
        length = tl.max(lengths, axis=0)
        best = tl.min(tl.where(lengths == length, pv, BLOCK_P), axis=0)  # the first longest path
        dv = tl.arange(0, BLOCK_D)
        drow = dv < D1
        path = tl.load(retrieve_ptr + best * D1 + dv, mask=drow, other=-1)  # [BD]
        last = tl.sum(tl.where(dv == length, path, 0), axis=0)
        bonus = tl.load(target_ptr + b * N + last)
        nxt = tl.load(retrieve_ptr + best * D1 + dv + 1, mask=dv + 1 < D1, other=0)  # node at depth d + 1
        tok = tl.load(cand_ptr + b * N + tl.maximum(nxt, 0), mask=dv < length, other=0)
        tokens = tl.where(dv < length, tok, tl.where(dv == length, bonus, -1))
        tl.store(path_ptr + b * D1 + dv, path, mask=drow)
        tl.store(tokens_ptr + b * D1 + dv, tokens, mask=drow)
        tl.store(length_ptr + b, length)
        tl.store(last_ptr + b, last)

    return accept_rows, triton.next_power_of_2


def accept(target: torch.Tensor, cand: torch.Tensor, parent: torch.Tensor, retrieve: torch.Tensor,
           max_accept: torch.Tensor | None = None):
    """target, cand [B, N] long (the target token drawn at each node; each node's candidate),
    parent [N] long, retrieve [P, D+1] long (root-to-leaf node ids, -1 padded), or per row
    parent [B, N] and retrieve [B, P, D+1] (dynamic trees), max_accept [B] or None
    -> (path [B, D+1], length [B], tokens [B, D+1], last_node [B]), as medusa.decoding.verify
    computes them."""
    accept_fn, next_pow2 = _kernel()
    B, N = cand.shape
    P, D1 = retrieve.shape[-2:]
    dev = cand.device
    rows = retrieve.dim() == 3
    parent, retrieve = parent.contiguous(), retrieve.contiguous()
    path = torch.empty(B, D1, dtype=torch.long, device=dev)
    tokens = torch.empty(B, D1, dtype=torch.long, device=dev)
    length = torch.empty(B, dtype=torch.long, device=dev)
    last = torch.empty(B, dtype=torch.long, device=dev)
    if B:
        accept_fn[(B,)](target.contiguous(), cand.contiguous(), parent, retrieve,
                        max_accept if max_accept is not None else length, path, length, tokens, last, N, P, D1,
                        N if rows else 0, P * D1 if rows else 0,
                        HAS_CAP=max_accept is not None, BLOCK_P=max(2, next_pow2(P)), BLOCK_D=max(2, next_pow2(D1)),
                        num_warps=1)
    return path, length, tokens, last
