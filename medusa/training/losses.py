"""Head losses: cross-entropy on the distilled tokens, optionally mixed with the teacher loss
(soft cross-entropy against the base model's distribution at the matching position), and
per-head weights decaying with the head's distance.

The LM head over a 49k vocabulary dominates the cost. The teacher distribution of a position
is the same for every head that learns it, so it is computed once per batch
(`teacher_probs`) and each head reads its rows by index. Losses run on the valid positions
only, in row chunks; with `checkpointed` the head's logits are recomputed in backward (less
memory, one more LM-head pass). Knows nothing of data files, optimisers or trees."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 8192


def head_weights(num_heads: int, decay: float) -> list[float]:
    """Loss weight of head i: decay ** i (the Medusa paper's 0.8 ** i)."""
    return [decay**i for i in range(num_heads)]


@dataclass(frozen=True)
class HeadLoss:
    loss: torch.Tensor  # scalar: mean over the valid rows
    correct: torch.Tensor  # scalar long: rows whose argmax equals the hard target
    rows: int


@torch.no_grad()
def teacher_probs(hidden: torch.Tensor, needed: torch.Tensor, teacher_lm) -> tuple[torch.Tensor, torch.Tensor]:
    """The base distribution at every needed position, computed once: hidden [B, T, D], needed
    [B, T] bool -> (probs [N, V] float32, row [B, T] long: the row of position (b, t) in probs,
    -1 where not needed). teacher_lm: [.., D] -> [.., V]."""
    hs = hidden[needed]  # [N, D]
    N = hs.shape[0]
    probs = hidden.new_zeros(0, 0, dtype=torch.float32)
    for a in range(0, N, CHUNK_ROWS):
        q = F.softmax(teacher_lm(hs[a: a + CHUNK_ROWS]).float(), dim=-1)
        if a == 0:
            probs = q.new_empty(N, q.shape[-1])
        probs[a: a + q.shape[0]] = q
    row = torch.full(needed.shape, -1, dtype=torch.long, device=hidden.device)
    row[needed] = torch.arange(N, device=hidden.device)
    return probs, row


def _chunk_loss(z, targets, q_rows, q_all, lm, teacher_weight: float):
    logits = lm(z).float()  # [M, V]
    logp = F.log_softmax(logits, dim=-1)
    loss = torch.zeros((), device=z.device)
    if teacher_weight < 1.0:
        loss = loss + (1.0 - teacher_weight) * F.nll_loss(logp, targets, reduction="sum")
    if teacher_weight > 0.0:
        loss = loss - teacher_weight * (q_all[q_rows] * logp).sum()
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct


def head_loss(z: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, lm, teacher: torch.Tensor | None = None,
              teacher_row: torch.Tensor | None = None, teacher_weight: float = 0.0, checkpointed: bool = True) -> HeadLoss:
    """z [B, T, D] head features, targets/valid [B, T] -> mean loss over the valid rows.
    lm: [.., D] -> [.., V]. With teacher_weight > 0: teacher [N, V] (`teacher_probs`) and
    teacher_row [B, T], the row of the matching base distribution for every position."""
    zs = z[valid]  # [M, D]
    ts = targets[valid]  # [M]
    M = zs.shape[0]
    if M == 0:
        return HeadLoss(z.sum() * 0.0, torch.zeros((), dtype=torch.long, device=z.device), 0)
    rows = teacher_row[valid] if teacher_weight > 0 else ts  # [M] (unused without a teacher)
    total = torch.zeros((), device=z.device)
    correct = torch.zeros((), dtype=torch.long, device=z.device)
    for a in range(0, M, CHUNK_ROWS):
        args = (zs[a: a + CHUNK_ROWS], ts[a: a + CHUNK_ROWS], rows[a: a + CHUNK_ROWS])
        fn = lambda z_, t_, r_: _chunk_loss(z_, t_, r_, teacher, lm, teacher_weight)  # noqa: E731
        loss, c = checkpoint(fn, *args, use_reentrant=False) if (checkpointed and torch.is_grad_enabled()) else fn(*args)
        total = total + loss
        correct = correct + c
    return HeadLoss(total / M, correct, M)


@dataclass(frozen=True)
class KLLoss:
    loss: torch.Tensor  # scalar: mean over the rows of KL(teacher || model), nats per token
    agree: torch.Tensor  # scalar long: rows whose argmax equals the teacher's
    rows: int


def _kl_chunk(h, p, lm):
    logq = F.log_softmax(lm(h).float(), dim=-1)  # [M, V]
    kl = (torch.xlogy(p, p) - p * logq).sum()  # sum over rows of sum_v p (log p - log q)
    agree = (logq.detach().argmax(-1) == p.argmax(-1)).sum()
    return kl, agree


def kl_loss(hidden: torch.Tensor, needed: torch.Tensor, teacher: torch.Tensor, lm, checkpointed: bool = True) -> KLLoss:
    """Self-distillation loss of an adapted backbone (Medusa-2): the mean KL divergence from the
    original model's distribution to the adapted one's at every needed position. hidden [B, T, D]
    the adapted model's final hidden states, needed [B, T] bool, teacher [N, V] the original's
    probabilities at the needed positions in order (`teacher_probs`), lm: [.., D] -> [.., V]."""
    hs = hidden[needed]  # [N, D]
    N = hs.shape[0]
    if N == 0:
        return KLLoss(hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device), 0)
    total = torch.zeros((), device=hidden.device)
    agree = torch.zeros((), dtype=torch.long, device=hidden.device)
    for a in range(0, N, CHUNK_ROWS):
        args = (hs[a: a + CHUNK_ROWS], teacher[a: a + CHUNK_ROWS])
        fn = lambda h_, p_: _kl_chunk(h_, p_, lm)  # noqa: E731
        kl, c = checkpoint(fn, *args, use_reentrant=False) if (checkpointed and torch.is_grad_enabled()) else fn(*args)
        total = total + kl
        agree = agree + c
    return KLLoss(total / N, agree, N)
