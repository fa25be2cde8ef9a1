"""Acceptance rules: which tree candidates the base model accepts, and the bonus token.

Every rule reduces to one question per tree node, "is this candidate compatible with the
base model at its parent?"; the accepted path is the deepest chain of compatible nodes.
- greedy: the candidate is the base model's argmax at its parent. Output equals plain greedy.
- sample: draw x ~ p(. | parent) (temperature, top-k, top-p); the candidate is compatible if it
  equals x. Candidates are deterministic top-k guesses, so this is rejection sampling with a
  point-mass draft: each emitted token is an exact draw from the base distribution, lossless.
- typical: p(candidate | parent) > min(epsilon, alpha * exp(-entropy(parent))) (Medusa's
  typical acceptance; faster, not distribution-preserving).
The bonus token at the last accepted node is the target token there (argmax or a draw).

Pure functions over tensors; knows nothing of models, caches or heads."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from medusa.decoding.logprobs import PathLogprobs
from medusa.decoding.sampling import BatchSampling, base_probs, sample_from
from medusa.decoding.tree import Tree
from medusa.kernels import accept as accept_kernel
from medusa.kernels import enabled as kernels_enabled


@dataclass(frozen=True)
class Acceptance:
    path: torch.Tensor  # [B, D+1] node ids of the chosen root-to-leaf path (-1 padded)
    length: torch.Tensor  # [B] accepted candidates beyond the root (0..D)
    tokens: torch.Tensor  # [B, D+1] emitted tokens: accepted candidates then the bonus token, padded
    last_node: torch.Tensor  # [B] node id of the last accepted node (its hidden state feeds the heads)
    packed: torch.Tensor | None = None  # [B, 1 + 2(D+1)] length, tokens, path in one tensor (`packed`)
    logprobs: PathLogprobs | None = None  # of the emitted tokens, when the step was asked for them (logprobs.py)

    @property
    def emitted(self) -> torch.Tensor:  # [B] tokens this step emits (accepted + bonus)
        return self.length + 1


def packed(acc: Acceptance) -> Acceptance:
    """`acc` with its host-side fields in one tensor, [B, 1 + 2(D+1)]: length, the D+1 emitted
    tokens, the D+1 path node ids. Built inside the step (and its graph) so that the scheduler
    reads a step's outcome with one copy and no per-step slicing or concatenation."""
    return replace(acc, packed=torch.cat([acc.length[:, None], acc.tokens, acc.path], 1))


def _targets(logits: torch.Tensor, s: BatchSampling, uniforms: torch.Tensor | None):
    """Per-node target token [B, N] and, when needed, the probabilities [B, N, V]."""
    if uniforms is None or not s.any_random:
        return logits.argmax(-1), None
    probs = base_probs(logits, s)
    return sample_from(probs, uniforms), probs


def _typical_ok(logits, cand, tree: Tree, s: BatchSampling) -> torch.Tensor:
    """[B, N] bool: candidate's posterior at its parent clears the typical threshold."""
    temp = s.temperature.clamp_min(1e-6)[:, None, None]
    logp = torch.log_softmax(logits.float() / temp, dim=-1)  # [B, N, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [B, N]
    parent = tree.parent.to(cand.device)
    B, N = cand.shape
    parent = parent.expand(B, N)  # [B, N]: a static tree's [N] for every row, or a dynamic tree's own
    rows = torch.arange(B, device=cand.device)[:, None]
    p_cand = logp[rows, parent, cand].exp()  # [B, N]: each candidate's probability at its parent
    thresh = torch.minimum(s.threshold[:, None], s.alpha[:, None] * torch.exp(-entropy.gather(1, parent)))
    return p_cand > thresh


def verify(
    logits: torch.Tensor,  # [B, N, V] base logits at every tree node
    cand: torch.Tensor,  # [B, N] candidate token of every node (root = already chosen token)
    tree: Tree,  # or a dynamic_tree.RowTrees: parent [B, N] and retrieve [B, P, D+1], one tree per row
    s: BatchSampling,
    uniforms: torch.Tensor | None = None,  # [B, N] draws for sampled rows (None: all greedy)
    max_accept: torch.Tensor | None = None,  # [B] long: cap on accepted candidates per row (0 = root only)
) -> Acceptance:
    B, N = cand.shape
    dev = cand.device
    target, _ = _targets(logits, s, uniforms)  # [B, N]
    parent = tree.parent.to(dev)
    retrieve = tree.retrieve.to(dev)  # [P, D+1], or [B, P, D+1] per row
    if not s.any_typical and kernels_enabled(cand.device):  # the same path in one launch (greedy and sample)
        return Acceptance(*accept_kernel.accept(target, cand, parent, retrieve, max_accept))
    return _accept(target, cand, logits, tree, s, parent, retrieve, max_accept)


def _accept(target, cand, logits, tree: Tree, s: BatchSampling, parent, retrieve, max_accept) -> Acceptance:
    """verify's torch path (and the reference of medusa.kernels.accept)."""
    dev = cand.device
    B = cand.shape[0]
    ok = cand == target.gather(1, parent.expand(B, -1))  # [B, N]: node matches its parent's target
    if s.any_typical:
        typical_rows = s.typical & (s.temperature > 0)
        ok = torch.where(typical_rows[:, None], _typical_ok(logits, cand, tree, s), ok)
    ok[:, 0] = True
    valid = retrieve >= 0
    safe = retrieve.clamp_min(0)
    if retrieve.dim() == 3:  # a tree per row
        P, D1 = retrieve.shape[1:]
        path_ok = ok.gather(1, safe.reshape(B, P * D1)).reshape(B, P, D1) & valid  # [B, P, D+1]
    else:
        path_ok = ok[:, safe] & valid  # [B, P, D+1]
    run = path_ok[..., 1:].long().cumprod(-1)  # [B, P, D]: still accepting at depth d+1
    lengths = run.sum(-1)  # [B, P]
    if max_accept is not None:  # truncating the path keeps every rule exact (the bonus is the target there)
        lengths = torch.minimum(lengths, max_accept[:, None])
    best = lengths.argmax(-1)  # [B] first longest path
    length = lengths.gather(1, best[:, None]).squeeze(1)  # [B]
    path = retrieve[best] if retrieve.dim() == 2 else retrieve[torch.arange(B, device=dev), best]  # [B, D+1]
    last_node = path.gather(1, length[:, None]).squeeze(1)  # [B]
    path_tokens = cand.gather(1, path.clamp_min(0))  # [B, D+1]
    bonus = target.gather(1, last_node[:, None]).squeeze(1)  # [B]
    # emitted: candidates at depths 1..length, then the bonus
    D1 = path.shape[1]
    idx = torch.arange(D1, device=dev)[None]  # [1, D+1]
    shifted = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)  # depth d+1 at index d
    tokens = torch.where(idx < length[:, None], shifted, torch.where(idx == length[:, None], bonus[:, None], -1))
    return Acceptance(path, length, tokens, last_node)
