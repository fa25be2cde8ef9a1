"""Draft vocabularies: heads that propose only among the tokens most frequent in their training
responses. Their top-k is the full top-k with the other tokens removed, decoding output is
unchanged (verification still scores the whole vocabulary), and the ids travel with the heads."""
from __future__ import annotations

import json

import pytest
import torch

from medusa.decoding.generate import generate
from medusa.decoding.tree import build_tree, prior_accuracies, search_tree
from medusa.errors import HeadsMismatchError, RequestError
from medusa.heads.base import HeadsConfig
from medusa.heads.io import build_heads, fingerprint, load_heads, save_heads, write_draft_vocab
from medusa.training.data import Record, draft_vocab_from
from tests.unit.test_hydra import random_heads, tiny_model

V = 61  # tiny_model's vocabulary


def medusa_heads(base, own_lm_head: bool = False, seed: int = 1):
    cfg = HeadsConfig("medusa", 3, 1, base.cfg.hidden_size, V, fingerprint(base), own_lm_head=own_lm_head)
    heads = build_heads(cfg, base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return heads.eval().requires_grad_(False)


def some_heads(kind: str, base):
    return medusa_heads(base, own_lm_head=kind == "medusa-own") if kind.startswith("medusa") else random_heads(base, kind)


KINDS = ["medusa", "medusa-own", "hydra", "hydra++"]


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_within_a_draft_vocabulary_is_the_full_top_k_without_the_other_tokens(kind):
    base = tiny_model()
    heads = some_heads(kind, base)
    z = torch.randn(5, 7, base.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    full = [heads.lm_logits(i, z, base) for i in range(3)]  # [5, 7, V] each
    assert torch.equal(heads.draft_topk(0, z, base, 4), full[0].topk(4, dim=-1).indices)  # no vocabulary: plain top-k
    each = heads.draft_topk_each(z[:, :3], base, 4)
    assert all(torch.equal(each[:, j], full[j][:, j].topk(4, dim=-1).indices) for j in range(3))

    keep = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:23]
    heads.set_draft_vocab(keep, base)
    assert heads.config.extra["draft_vocab"] == 23 and heads.draft_weight.shape[-2:] == (23, base.cfg.hidden_size)
    outside = torch.ones(V, dtype=torch.bool)
    outside[keep] = False
    for i in range(3):
        expected = full[i].masked_fill(outside, float("-inf")).topk(4, dim=-1).indices
        assert torch.equal(heads.draft_topk(i, z, base, 4), expected), f"head {i}"

    # every head at once (Medusa's propose): head j's rows at [..., j, :], one GEMM and one top-k
    each = heads.draft_topk_each(z[:, :3], base, 4)  # [5, 3, 4]
    for j in range(3):
        assert torch.equal(each[:, j], heads.draft_topk(j, z[:, j], base, 4)), f"head {j}"

    heads.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(4)), base)  # every token, shuffled
    assert torch.equal(heads.draft_topk(2, z, base, 4), full[2].topk(4, dim=-1).indices)
    heads.set_draft_vocab(None, base)
    assert heads.draft_vocab is None and "draft_vocab" not in heads.config.extra


def test_a_malformed_draft_vocabulary_is_refused():
    base = tiny_model()
    heads = medusa_heads(base)
    for bad in ([], [3, 3], [V], [-1]):
        with pytest.raises(ValueError):
            heads.set_draft_vocab(torch.tensor(bad, dtype=torch.long), base)


@pytest.mark.parametrize("kind", ["medusa", "hydra++"])
def test_decoding_with_a_draft_vocabulary_still_equals_plain_greedy(kind):
    """Proposals come from the vocabulary (the root, the base model's own choice, may not), and
    both the batch-1 loop and the batched engine still give plain greedy output."""
    from medusa.decoding.engine import Engine, Request

    base = tiny_model()
    heads = some_heads(kind, base) if kind == "medusa" else random_heads(base, kind, std=0.05, rest_std=0.01)
    keep = torch.arange(0, V, 2)  # the even tokens
    heads.set_draft_vocab(keep, base)
    tree = build_tree(search_tree(prior_accuracies(3, 3), 8))
    prompts = [[1, 2, 3, 4, 5], [7, 7, 7], [11, 3, 19, 23, 5, 8, 2]]
    plain = [[t for c in generate(base, ids, max_new_tokens=14, stop_token_ids=()) for t in c.tokens] for ids in prompts]
    for ids, want in zip(prompts, plain):
        assert [t for c in generate(base, ids, heads=heads, tree=tree, max_new_tokens=14, stop_token_ids=()) for t in c.tokens] == want
    engine = Engine(base, heads, tree, max_batch=2)
    outs = [h.result() for h in [engine.submit(Request(ids, max_new_tokens=14, stop_token_ids=(), speculation="on"))
                                 for ids in prompts]]
    assert [tokens for tokens, _ in outs] == plain
    if kind == "hydra++":
        state = heads.new_state(1, 32, base)
        heads.observe(state, torch.randn(1, 3, base.cfg.hidden_size), torch.arange(3)[None], torch.tensor([3]))
        hidden = torch.randn(1, base.cfg.hidden_size)
    else:
        state, hidden = None, torch.randn(1, base.cfg.hidden_size)
    cand = heads.propose(state, hidden, torch.tensor([9]), tree, base)  # root 9 is odd
    assert cand[0, 0] == 9 and bool((cand[0, 1:] % 2 == 0).all())


def test_the_vocabulary_travels_with_the_heads_and_can_be_written_in_place(tmp_path):
    from safetensors.torch import load_file

    base = tiny_model()
    heads = random_heads(base, "hydra++")
    folder = save_heads(heads.to(torch.float16), tmp_path / "h")
    weights = load_file(str(folder / "heads.safetensors"))
    keep = torch.tensor([3, 5, 8, 13, 21, 34, 55])
    cfg = write_draft_vocab(folder, keep, 0.875)
    assert cfg.extra["draft_vocab"] == 7 and cfg.extra["draft_vocab_coverage"] == 0.875
    after = load_file(str(folder / "heads.safetensors"))
    assert torch.equal(after.pop("draft_vocab"), keep)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)  # weights untouched, still float16
    loaded = load_heads(folder, base)
    assert torch.equal(loaded.draft_vocab, keep) and loaded.draft_weight is not None
    torch.testing.assert_close(loaded.draft_weight[0], base.lm_head.weight[keep])
    write_draft_vocab(folder, None)
    assert load_heads(folder, base).draft_vocab is None
    assert "draft_vocab" not in json.loads((folder / "heads.json").read_text())["extra"]
    with pytest.raises(HeadsMismatchError):
        write_draft_vocab(folder, torch.tensor([V]))


def test_the_most_frequent_response_tokens_are_kept():
    records = [Record("a", "greedy", [9, 9, 9, 9], [1, 2, 2, 3, 3, 3]), Record("b", "greedy", [9], [4, 4, 3, 5])]
    # response counts: 3 four times, 2 and 4 twice, 1 and 5 once; prompt tokens (9) are not counted
    ids, coverage = draft_vocab_from(records, 10, 2)
    assert ids.tolist() == [2, 3] and coverage == pytest.approx(6 / 10)  # 2 and 4 tie: the lower id stays
    ids, coverage = draft_vocab_from(records, 10, 3)
    assert ids.tolist() == [2, 3, 4] and coverage == pytest.approx(8 / 10)
    ids, coverage = draft_vocab_from(records, 10, 10)
    assert ids.tolist() == list(range(10)) and coverage == 1.0
    for size in (0, 11):
        with pytest.raises(RequestError):
            draft_vocab_from(records, 10, size)
    with pytest.raises(RequestError):
        draft_vocab_from([Record("c", "greedy", [1], [12])], 10, 2)


def test_vocab_command(tmp_path, capsys):
    from medusa.cli import main

    base = tiny_model()
    folder = save_heads(random_heads(base, "hydra"), tmp_path / "h")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(Record(f"r{i}", "greedy", [1], [(i + k) % 7 + 10 for k in range(12)]).to_json() + "\n" for i in range(20)))
    assert main(["vocab", "--heads", str(folder), "--data", str(data), "--size", "5", "--heldout", "0"]) == 0
    assert "proposes from 5 of 61 tokens" in capsys.readouterr().err
    loaded = load_heads(folder, base)
    assert set(loaded.draft_vocab.tolist()) <= set(range(10, 17)) and loaded.config.extra["draft_vocab_coverage"] > 5 / 7 - 0.01
    assert main(["vocab", "--heads", str(folder), "--size", "0"]) == 0
    assert load_heads(folder, base).draft_vocab is None
    for args, message in ((["--data", str(data), "--size", "-1"], "--size must be >= 0"),
                          (["--size", "5"], "--data is needed"),
                          (["--data", str(data), "--size", "62"], "1 to 61 tokens"),
                          (["--data", str(tmp_path / "none.jsonl"), "--size", "5"], "no distilled data")):
        assert main(["vocab", "--heads", str(folder), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["vocab", "--heads", str(tmp_path), "--data", str(data), "--size", "5"]) == 2
    assert "not a heads folder" in capsys.readouterr().err
    (folder / "heads.safetensors").write_bytes(b"not safetensors")
    assert main(["vocab", "--heads", str(folder), "--data", str(data), "--size", "5"]) == 2
    err = capsys.readouterr().err
    assert "not a readable heads folder" in err and "Traceback" not in err


def test_heads_built_with_a_vocabulary_refuse_to_propose_until_bound():
    """Draft-vocabulary weights are bound when the weights are loaded (medusa.heads.io), never
    lazily inside a forward: heads built with a vocabulary in their config but not bound raise,
    and propose once bound."""
    base = tiny_model()
    cfg = HeadsConfig("medusa", 3, 1, base.cfg.hidden_size, V, fingerprint(base), extra={"draft_vocab": 4})
    heads = build_heads(cfg, base)
    heads.draft_vocab.copy_(torch.tensor([2, 4, 6, 8]))
    tree = build_tree([[0], [0, 0]])
    hidden = torch.randn(1, base.cfg.hidden_size)
    with pytest.raises(RuntimeError, match="bind_draft_vocab"):
        heads.propose(None, hidden, torch.tensor([9]), tree, base)
    heads.bind_draft_vocab(base)
    cand = heads.propose(None, hidden, torch.tensor([9]), tree, base)
    assert cand[0, 0] == 9 and set(cand[0, 1:].tolist()) <= {2, 4, 6, 8}
