"""Per-row sampling parameters and the base distribution they define (temperature, then
top-k and top-p applied to the base model's logits). Pure tensor functions; the random
draws come in as uniforms so that callers own the generators (one per request)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from medusa.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    rule: str = "greedy"  # greedy | typical | sample (sample and typical need temperature > 0)
    posterior_threshold: float = 0.09  # typical acceptance epsilon
    posterior_alpha: float = 0.3  # typical acceptance alpha (Medusa paper: sqrt of epsilon)
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top-k must be >= 0, got {self.top_k}")
        if self.rule not in ("greedy", "typical", "sample"):
            raise RequestError(f"unknown acceptance rule {self.rule!r}: greedy, typical or sample")
        if self.rule != "greedy" and self.temperature == 0:
            raise RequestError(f"rule {self.rule!r} needs --temperature > 0 (temperature 0 is greedy)")
        if self.rule == "greedy" and self.temperature > 0:
            raise RequestError("rule 'greedy' needs temperature 0; use --rule sample or typical")
        if not (0 < self.posterior_threshold < 1) or not (0 < self.posterior_alpha <= 1):
            raise RequestError("posterior threshold and alpha must be in (0, 1)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class BatchSampling:
    """SamplingParams of B rows as tensors (so one verify call serves a mixed batch)."""

    temperature: torch.Tensor  # [B] float (0 = greedy row)
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long (0 = off)
    typical: torch.Tensor  # [B] bool
    threshold: torch.Tensor  # [B] float
    alpha: torch.Tensor  # [B] float
    any_random: bool = False  # host-side flags, so a step needs no device sync to branch
    any_typical: bool = False
    # the rows' SamplingParams when built by `stack` (host values: a tensor-parallel replica
    # sends these to its other ranks, which stack their own copy, instead of the tensors)
    params: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def stack(cls, params: list[SamplingParams], device) -> "BatchSampling":
        f = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        return cls(
            f([p.temperature for p in params]),
            f([p.top_p for p in params]),
            f([p.top_k for p in params], torch.long),
            f([p.rule == "typical" for p in params], torch.bool),
            f([p.posterior_threshold for p in params]),
            f([p.posterior_alpha for p in params]),
            any(not p.greedy for p in params),
            any(p.rule == "typical" for p in params),
            tuple(params),
        )


def base_probs(logits: torch.Tensor, s: BatchSampling) -> torch.Tensor:
    """The distribution a row samples from. logits [B, N, V] -> probs [B, N, V] (float32).
    Greedy rows get a one-hot on the argmax."""
    logits = logits.float()
    temp = s.temperature.clamp_min(1e-6)[:, None, None]  # [B, 1, 1]
    probs = torch.softmax(logits / temp, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, N, V]
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    k = s.top_k[:, None, None]
    keep &= (k == 0) | (ranks < k)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays)
    before = sorted_p.cumsum(-1) - sorted_p
    keep &= before < s.top_p[:, None, None]
    sorted_p = sorted_p * keep
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    filtered = filtered / filtered.sum(-1, keepdim=True)
    greedy = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)  # (one_hot syncs on CUDA)
    return torch.where((s.temperature == 0)[:, None, None], greedy, filtered)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw. probs [B, N, V], uniforms [B, N] in [0, 1) -> tokens [B, N]."""
    cdf = probs.cumsum(-1)
    u = uniforms[..., None] * cdf[..., -1:]  # guard against cdf[-1] slightly below 1
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def draw_uniforms(generators: list[torch.Generator | None], n: int, device) -> torch.Tensor:
    """[B, n] uniforms, row b from generators[b] (a request's own seeded generator)."""
    rows = [torch.rand(n, generator=g, device=g.device if g is not None else device) for g in generators]
    return torch.stack(rows).to(device)
