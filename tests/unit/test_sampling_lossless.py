"""Speculative sampling preserves the base distribution: on a tiny random model (vocab 8)
the first three tokens sampled through tree verification (a static tree, and a dynamic tree
grown per row) follow the exact base distribution (chi-square, 20k samples, fixed seed), while
typical acceptance (lossy by design) does not."""
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from medusa.decoding.sampling import BatchSampling, SamplingParams, base_probs
from medusa.decoding.step import attention_mask, prefill, speculate
from medusa.decoding.tree import load_tree
from medusa.heads.base import HeadsConfig
from medusa.heads.medusa import MedusaHeads
from tests.conftest import tiny_model

PROMPT = [3, 1, 4, 1, 5]
DEPTH = 3  # compare joint distributions of the first DEPTH sampled tokens
SAMPLES = 20_000


def exact_joint(model, params: SamplingParams) -> np.ndarray:
    """p(x1, x2, x3 | prompt) under temperature/top-k/top-p, for all 8**3 continuations."""
    V = model.cfg.vocab_size
    seqs = list(itertools.product(range(V), repeat=2))
    tokens = torch.tensor([PROMPT + list(s) for s in seqs])  # [V^2, T+2]
    B, T = tokens.shape
    cache = model.new_cache(B, 32)
    pos = torch.arange(T)[None].expand(B, T)
    mask = attention_mask(torch.zeros(B, dtype=torch.long), torch.ones(T, T, dtype=torch.bool).tril(), 32)

    probs = base_probs(model(tokens, pos, cache, pos, mask).logits, BatchSampling.stack([params] * B, "cpu"))
    n = len(PROMPT)
    joint = np.zeros((V,) * DEPTH)
    for i, (x1, x2) in enumerate(seqs):  # p(x1) p(x2 | x1) p(x3 | x1, x2)
        joint[x1, x2, :] = (probs[i, n - 1, x1] * probs[i, n, x2] * probs[i, n + 1]).numpy()
    return joint.reshape(-1)


def sample_speculatively(model, heads, tree, params: SamplingParams) -> np.ndarray:
    """First DEPTH tokens of SAMPLES independent rows, decoded through prefill + speculate."""
    torch.manual_seed(1234)
    B = SAMPLES
    s = BatchSampling.stack([params] * B, "cpu")
    cache = model.new_cache(B, 40)
    tokens = torch.tensor([PROMPT] * B)
    state = prefill(model, heads, cache, tokens, torch.zeros(B, dtype=torch.long), s, torch.rand(B, 1))
    out = [[int(r)] for r in state.root]
    while min(len(o) for o in out) < DEPTH:
        acc = speculate(model, heads, tree, state, s, torch.rand(B, tree.num_nodes))
        for b in range(B):
            out[b].extend(acc.tokens[b, : int(acc.length[b]) + 1].tolist())
    V = model.cfg.vocab_size
    codes = [sum(t * V ** (DEPTH - 1 - k) for k, t in enumerate(o[:DEPTH])) for o in out]
    return np.bincount(codes, minlength=V**DEPTH)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs / probs.sum() * counts.sum()
    keep = expected >= 5  # pool sparse cells into one
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def model_and_heads():
    model = tiny_model(seed=7)
    cfg = HeadsConfig("medusa", 4, 1, model.cfg.hidden_size, model.cfg.vocab_size, "tiny")
    heads = MedusaHeads(cfg)
    torch.manual_seed(3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)  # non-zero: varied drafts that are sometimes right
    return model, heads.eval()


@pytest.mark.parametrize("tree", ["tree16", "dynamic16"])  # dynamic: a tree per row and step, from the heads' confidences
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, rule="sample"),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.9, rule="sample"),
])
def test_speculative_sampling_matches_base_distribution(model_and_heads, params, tree):
    model, heads = model_and_heads
    with torch.inference_mode():
        exact = exact_joint(model, params)
        counts = sample_speculatively(model, heads, load_tree(tree), params)
    assert exact.sum() == pytest.approx(1.0, abs=1e-5)
    assert chi2_pvalue(counts, exact) > 1e-3


def test_the_check_has_power_typical_acceptance_is_lossy(model_and_heads):
    """Same check on typical acceptance, which accepts any plausible candidate: it must fail,
    so the test above is able to detect a distribution-changing rule."""
    model, heads = model_and_heads
    params = SamplingParams(temperature=1.0, rule="typical", posterior_threshold=0.3, posterior_alpha=0.5)
    with torch.inference_mode():
        exact = exact_joint(model, params)
        counts = sample_speculatively(model, heads, load_tree("tree16"), params)
    assert chi2_pvalue(counts, exact) < 1e-6
