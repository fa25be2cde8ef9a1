"""How close an adapted backbone (Medusa-2) stays to the original model, on held-out prompts:
- the mean per-token KL divergence KL(original || adapted) of the next-token distributions
  along the original's own greedy continuation (pooled over every scored token);
- the share of prompts whose greedy outputs are identical over their first N tokens (plain
  greedy decoding of each model through medusa.decoding.generate; a stop token ends an output);
- the perplexity of the original's greedy continuations under the original and under the
  adapted model (pooled over tokens).
`QualityBar` holds the thresholds a shipped variant must meet. Knows token ids only (the
command tokenizes) and nothing of training or files."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from medusa.decoding.generate import generate


@dataclass(frozen=True)
class QualityBar:
    """A variant keeps the original's quality when all three hold."""

    max_kl: float = 0.01  # nats per token
    min_identical: float = 0.9  # share of prompts with the same greedy output over the first N tokens
    max_ppl_ratio: float = 1.02  # perplexity of the original's outputs, adapted / original


@dataclass
class QualityReport:
    prompts: int
    new_tokens: int  # N: greedy tokens per prompt compared and scored
    tokens: int  # continuation tokens scored
    mean_kl: float
    identical: int  # prompts whose first N greedy tokens agree
    ppl_original: float
    ppl_adapted: float
    per_prompt: list[dict] = field(default_factory=list)  # {"kl", "tokens", "identical", "diverges_at"}

    @property
    def identical_share(self) -> float:
        return self.identical / self.prompts if self.prompts else 0.0

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_adapted / self.ppl_original

    def failures(self, bar: QualityBar) -> list[str]:
        """What misses the bar, one line each (empty: the quality is kept)."""
        out = []
        if not self.mean_kl <= bar.max_kl:
            out.append(f"mean KL {self.mean_kl:.5f} > {bar.max_kl}")
        if not self.identical_share >= bar.min_identical:
            out.append(f"identical outputs {self.identical_share:.3f} < {bar.min_identical}")
        if not self.ppl_ratio <= bar.max_ppl_ratio:
            out.append(f"perplexity ratio {self.ppl_ratio:.4f} > {bar.max_ppl_ratio}")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "identical_share": self.identical_share, "ppl_ratio": self.ppl_ratio}


def greedy_output(model, prompt_ids: list[int], n: int, stop_token_ids=None) -> list[int]:
    """Plain greedy decoding of `model` (no heads), at most n new tokens."""
    return [t for c in generate(model, prompt_ids, max_new_tokens=n, stop_token_ids=stop_token_ids) for t in c.tokens]


@torch.inference_mode()
def continuation_logprobs(model, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """log p(next token) at each continuation position: [C, V] float32, row j the distribution
    that predicts continuation[j] (one forward over prompt + continuation[:-1])."""
    seq = torch.tensor([prompt_ids + continuation[:-1]], dtype=torch.long, device=model.device)  # [1, T]
    T = seq.shape[1]
    pos = torch.arange(T, device=model.device)[None]
    causal = torch.ones(T, T, dtype=torch.bool, device=model.device).tril()[None]
    picks = torch.arange(len(prompt_ids) - 1, T, device=model.device)[None]  # [1, C]
    logits = model(seq, pos, model.new_cache(1, T), pos, causal, logits_for=picks).logits[0]  # [C, V]
    return F.log_softmax(logits.float(), dim=-1)


def compare(original, adapted, prompts: list[list[int]], new_tokens: int = 64, stop_token_ids=None,
            progress=None) -> QualityReport:
    """The quality figures of `adapted` against `original` (two models of the same vocabulary)."""
    kl_sum, nll_o, nll_a, scored, same = 0.0, 0.0, 0.0, 0, 0
    rows = []
    for ids in prompts:
        ref = greedy_output(original, ids, new_tokens, stop_token_ids)
        out = greedy_output(adapted, ids, new_tokens, stop_token_ids)
        identical = ref[:new_tokens] == out[:new_tokens]
        diverges = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), None if identical else min(len(ref), len(out)))
        same += identical
        lp_o = continuation_logprobs(original, ids, ref)  # [C, V]
        lp_a = continuation_logprobs(adapted, ids, ref).to(lp_o.device)
        kl = (lp_o.exp() * (lp_o - lp_a)).sum(-1)  # [C]
        target = torch.tensor(ref, device=lp_o.device)[:, None]
        nll_o += float(-lp_o.gather(1, target).sum())
        nll_a += float(-lp_a.gather(1, target).sum())
        kl_sum += float(kl.sum())
        scored += len(ref)
        rows.append({"kl": float(kl.mean()), "tokens": len(ref), "identical": identical, "diverges_at": diverges})
        if progress:
            progress(1)
    n = max(scored, 1)
    return QualityReport(len(prompts), new_tokens, scored, kl_sum / n, same, math.exp(nll_o / n), math.exp(nll_a / n), rows)
