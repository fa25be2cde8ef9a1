"""Per-token log-probabilities (Request.logprobs): the raw base distribution at each emitted
token's position, exact under speculation: Hydra++ tree steps give the values plain decoding
gives and a teacher-forced forward over the whole sequence gives; top-k alternatives sorted and,
under greedy, led by the emitted token; rows that did not ask get none."""
from __future__ import annotations

import pytest
import torch

from medusa.decoding.engine import Engine, Request, SamplingParams
from medusa.decoding.generate import generate
from medusa.decoding.logprobs import MAX_TOP
from medusa.decoding.tree import load_tree
from medusa.errors import RequestError
from medusa.training.features import base_hidden

# float32: a tree step against a plain step of the same batch (measured up to 7e-6); against a
# teacher-forced forward over the whole sequence, whose different shapes alone move plain
# decoding's values by up to 4e-5 (measured), so that comparison gets that noise's room
TOL = dict(abs=1e-5)
TOL_TF = dict(abs=5e-5)
NEW = 24


def teacher_forced(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    """[len(out), V] raw log_softmax of the base model at each output position, one forward."""
    with torch.no_grad():
        h = base_hidden(model, torch.tensor([prompt + out]))[0]  # [T, D]
        logits = model.lm_head(h[len(prompt) - 1:len(prompt) + len(out) - 1])
    return torch.log_softmax(logits.float(), -1)


def run_engine(model, heads, prompts, speculation, logprobs, tree="tree16", params=SamplingParams()):
    t = load_tree(tree)
    eng = Engine(model, heads, t, max_batch=len(prompts), max_seq_len=256)
    hs = [eng.submit(Request(p, max_new_tokens=NEW, speculation=speculation, logprobs=k, sampling=params))
          for p, k in zip(prompts, logprobs)]
    out = []
    for h in hs:
        toks, lps = [], []
        for ev in h:
            toks += ev.tokens
            if ev.logprobs is None:
                lps = None
            else:
                assert len(ev.logprobs) == len(ev.tokens)
                lps += ev.logprobs
        out.append((toks, lps))
    return out, eng


@pytest.fixture(scope="module")
def chat_prompts(stack):
    tok = stack.tokenizer
    return [tok.encode_prompt(x) for x in ("What is 2 + 2? Explain.", "Name three colors.", "Write a haiku about rain.")]


def test_logprobs_under_hydra_speculation_equal_plain_and_teacher_forced(stack, chat_prompts):
    model, heads = stack.model, stack.heads
    assert heads.config.head_type == "hydra++"
    ks = [5, 0, None]  # top 5, the token alone, not asked (rides in the same steps)
    spec, eng = run_engine(model, heads, chat_prompts, "on", ks)
    assert sum(v for k, v in eng.stats()["steps_by_tree"].items() if k != "ar") > 0  # speculative steps ran
    assert eng.stats()["accepted_per_pos"][0] > 0  # and accepted drafts
    plain, _ = run_engine(model, heads, chat_prompts, "off", ks)
    for p, k, (st, sl), (pt, pl) in zip(chat_prompts, ks, spec, plain):
        assert st == pt  # greedy: the same tokens
        if k is None:
            assert sl is None and pl is None
            continue
        assert len(sl) == len(st) > 0  # (a row may end early at EOS)
        ref = teacher_forced(model, p, st)
        for i, (a, b) in enumerate(zip(sl, pl)):
            assert a.token_id == b.token_id == st[i]
            assert a.logprob == pytest.approx(b.logprob, **TOL)
            assert a.logprob == pytest.approx(float(ref[i, st[i]]), **TOL_TF)
            assert len(a.top) == k
            if k:
                vals = [v for _, v in a.top]
                assert vals == sorted(vals, reverse=True)
                assert a.top[0][0] == st[i]  # greedy: the emitted token is the most likely one
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
                top_ref = ref[i].topk(k)
                assert [t for t, _ in a.top] == top_ref.indices.tolist()
                assert vals == pytest.approx(top_ref.values.tolist(), **TOL_TF)


def test_sampled_tokens_get_the_raw_distribution_not_the_tempered_one(stack, chat_prompts):
    """The logprob reported is log_softmax of the logits, before temperature and top-p."""
    model, heads = stack.model, stack.heads
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=3, rule="sample")
    [(toks, lps)], _ = run_engine(model, heads, chat_prompts[:1], "on", [2], params=params)
    ref = teacher_forced(model, chat_prompts[0], toks)
    assert len(lps) == len(toks)
    for i, e in enumerate(lps):
        assert e.logprob == pytest.approx(float(ref[i, toks[i]]), **TOL_TF)
        assert e.logprob <= e.top[0][1] + 1e-6


def test_batch_one_generate_returns_logprobs(stack, chat_prompts):
    chunks = list(generate(stack.model, chat_prompts[0], heads=stack.heads, tree="tree16", max_new_tokens=8, logprobs=1))
    toks = [t for c in chunks for t in c.tokens]
    lps = [e for c in chunks for e in c.logprobs]
    assert [e.token_id for e in lps] == toks and all(len(e.top) == 1 for e in lps)
    plain = list(generate(stack.model, chat_prompts[0], max_new_tokens=8))
    assert all(c.logprobs is None for c in plain)


@pytest.mark.parametrize("bad", [-1, MAX_TOP + 1, 20, True, 1.5])
def test_logprobs_out_of_range_is_a_request_error(stack, bad):
    eng = Engine(stack.model, None, "ar", max_batch=1, max_seq_len=64)
    with pytest.raises(RequestError, match="logprobs"):
        eng.submit(Request([1, 2, 3], max_new_tokens=2, logprobs=bad))


def test_the_services_cap_is_the_engines():
    """The ingress (no torch) keeps its own copy of the cap on alternatives."""
    pytest.importorskip("grpc")
    from services.logprobs import MAX_TOP as services_max

    assert services_max == MAX_TOP == 5
