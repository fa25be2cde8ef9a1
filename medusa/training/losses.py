"""Head losses: cross-entropy on the distilled tokens, optionally mixed with the teacher loss
(soft cross-entropy against the base model's distribution at the matching position), and
per-head weights decaying with the head's distance.

The LM head over a 49k vocabulary dominates memory, so losses run on the valid positions
only, in row chunks, under activation checkpointing (logits are recomputed in backward).
Knows nothing of data files, optimisers or trees."""
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


def _chunk_loss(z, targets, teacher_h, lm, teacher_lm, teacher_weight: float):
    logits = lm(z).float()  # [M, V]
    logp = F.log_softmax(logits, dim=-1)
    loss = torch.zeros((), device=z.device)
    if teacher_weight < 1.0:
        loss = loss + (1.0 - teacher_weight) * F.nll_loss(logp, targets, reduction="sum")
    if teacher_weight > 0.0:
        with torch.no_grad():
            q = F.softmax(teacher_lm(teacher_h).float(), dim=-1)  # [M, V]
        loss = loss - teacher_weight * (q * logp).sum()
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct


def head_loss(z: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, lm, teacher_lm=None,
              teacher_h: torch.Tensor | None = None, teacher_weight: float = 0.0, checkpointed: bool = True) -> HeadLoss:
    """z [B, T, D] head features, targets/valid [B, T], teacher_h [B, T, D] (base hidden at the
    matching position) -> mean loss over valid rows. lm / teacher_lm: [.., D] -> [.., V]."""
    zs = z[valid]  # [M, D]
    ts = targets[valid]  # [M]
    hs = teacher_h[valid] if teacher_weight > 0 else None
    M = zs.shape[0]
    if M == 0:
        return HeadLoss(z.sum() * 0.0, torch.zeros((), dtype=torch.long, device=z.device), 0)
    total = torch.zeros((), device=z.device)
    correct = torch.zeros((), dtype=torch.long, device=z.device)
    for a in range(0, M, CHUNK_ROWS):
        args = (zs[a: a + CHUNK_ROWS], ts[a: a + CHUNK_ROWS], hs[a: a + CHUNK_ROWS] if hs is not None else None)
        fn = lambda z_, t_, h_: _chunk_loss(z_, t_, h_, lm, teacher_lm, teacher_weight)  # noqa: E731
        loss, c = checkpoint(fn, *args, use_reentrant=False) if (checkpointed and torch.is_grad_enabled()) else fn(*args)
        total = total + loss
        correct = correct + c
    return HeadLoss(total / M, correct, M)
