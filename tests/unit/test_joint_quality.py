"""The quality figures of an adapted backbone (medusa.training.quality) against a direct
computation on a tiny model: greedy by full forwards without a cache, KL and perplexity from
whole-sequence logits; and the bar's verdict."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medusa.training.features import base_hidden
from medusa.training.lora import LoRAConfig, LoRALinear, apply_lora
from medusa.training.quality import QualityBar, QualityReport, compare
from tests.unit.test_training import tiny_base


def adapted_copy(std: float, seed: int = 3):
    """The same tiny model with small LoRA adapters (unmerged)."""
    m = tiny_base()
    apply_lora(m, LoRAConfig(rank=4, alpha=4.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * std)
    return m.requires_grad_(False)


def logits_of(model, seq):
    with torch.no_grad():
        return model.lm_head(base_hidden(model, torch.tensor([seq])))[0]  # [T, V]


def reference_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(logits_of(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def test_quality_figures_match_a_direct_computation():
    original, adapted = tiny_base(), adapted_copy(std=0.05)
    prompts = [[3, 5 + i, 7, (11 * i) % 30 + 1] for i in range(5)]
    n = 8
    report = compare(original, adapted, prompts, n, stop_token_ids=())
    kl_sum, nll_o, nll_a, tokens, same = 0.0, 0.0, 0.0, 0, 0
    for p in prompts:
        ref, out = reference_greedy(original, p, n), reference_greedy(adapted, p, n)
        same += ref == out
        P = len(p)
        lo = F.log_softmax(logits_of(original, p + ref)[P - 1: P + n - 1], -1)  # [n, V]: predicts ref
        la = F.log_softmax(logits_of(adapted, p + ref)[P - 1: P + n - 1], -1)
        kl_sum += float(F.kl_div(la, lo, log_target=True, reduction="sum"))
        nll_o += float(F.cross_entropy(lo, torch.tensor(ref), reduction="sum"))
        nll_a += float(F.cross_entropy(la, torch.tensor(ref), reduction="sum"))
        tokens += n
    assert report.prompts == 5 and report.tokens == tokens and report.identical == same
    assert 0 < same < 5, same  # the perturbation flips some outputs and not others: both branches are exercised
    assert math.isclose(report.mean_kl, kl_sum / tokens, rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(report.ppl_original, math.exp(nll_o / tokens), rel_tol=1e-5)
    assert math.isclose(report.ppl_adapted, math.exp(nll_a / tokens), rel_tol=1e-5)
    diverged = [r for r in report.per_prompt if not r["identical"]]
    assert all(r["diverges_at"] is not None and 0 <= r["diverges_at"] < n for r in diverged)


def test_the_original_against_itself_keeps_everything():
    m = tiny_base()
    report = compare(m, m, [[3, 5, 7], [2, 9]], 8, stop_token_ids=())
    assert report.identical == 2 and abs(report.mean_kl) < 1e-6 and report.ppl_ratio == 1.0
    assert report.failures(QualityBar()) == []


def test_the_bar_names_what_it_misses():
    r = QualityReport(prompts=10, new_tokens=64, tokens=640, mean_kl=0.02, identical=8, ppl_original=2.0, ppl_adapted=2.1)
    fails = r.failures(QualityBar(max_kl=0.01, min_identical=0.9, max_ppl_ratio=1.02))
    assert len(fails) == 3 and "mean KL" in fails[0] and "identical" in fails[1] and "perplexity" in fails[2]
    assert r.failures(QualityBar(max_kl=0.05, min_identical=0.8, max_ppl_ratio=1.06)) == []
