"""Hydra / Hydra++ heads: proposal follows the teacher-forced head outputs, the Hydra++ prefix
layer's incremental KV matches a full causal pass, and speculative greedy equals plain greedy."""
from __future__ import annotations

import pytest
import torch

from medusa.decoding.generate import Stats, generate
from medusa.decoding.tree import build_tree, chain, prior_accuracies, search_tree
from medusa.heads.base import HeadsConfig
from medusa.heads.hydra import HydraHeads, prefix_extra
from medusa.heads.io import build_heads, fingerprint, load_heads, save_heads
from medusa.model.config import ModelConfig
from medusa.model.llama import Transformer


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(60,))
    m = Transformer(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval().requires_grad_(False)


def random_heads(base, head_type: str, num_heads: int = 3, num_layers: int = 2, std: float = 0.2, seed: int = 1,
                 rest_std: float | None = None) -> HydraHeads:
    """Heads with every weight random (the conditioning layers at `std`, the rest at `rest_std`)."""
    extra = prefix_extra(base) if head_type == "hydra++" else {}
    cfg = HeadsConfig(head_type, num_heads, num_layers, base.cfg.hidden_size, base.cfg.vocab_size, fingerprint(base), extra=extra)
    heads = build_heads(cfg, base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if "layernorm" not in name:
                scale = std if ("cond" in name or rest_std is None) else rest_std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads.to(base.dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("head_type", ["hydra", "hydra++"])
def test_proposal_matches_teacher_forced_heads(head_type):
    """Walk a chain tree with propose, then feed the proposed tokens back as the teacher-forced
    sequence: head i at the last committed position must pick the next proposed token."""
    base = tiny_model()
    heads = random_heads(base, head_type)
    tokens = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(3))
    hidden = base(tokens, torch.arange(9)[None], base.new_cache(1, 16), torch.arange(9)[None],
                  torch.ones(1, 9, 9, dtype=torch.bool).tril()).hidden  # [1, 9, D]
    state = heads.new_state(1, 32, base)
    heads.observe(state, hidden, torch.arange(9)[None], torch.tensor([9]))
    root = torch.tensor([7])
    tree = build_tree(chain(3))
    cand = heads.propose(state, hidden[:, -1], root, tree, base)  # [1, 4]
    assert cand[0, 0] == 7
    # teacher forcing on [tokens, root, c1, c2]: head i at t = 8 reads tokens t+1 .. t+1+i
    s = heads.summary(hidden, base)[:, -1]  # [1, D] summary at the last committed token
    path = cand[0].tolist()
    for i in range(3):
        embeds = base.embed_tokens(torch.tensor([path[: i + 1]]))  # [1, i+1, D]
        guess = heads.lm_logits(i, heads.head_hidden(i, s, embeds), base).argmax(-1)
        assert int(guess[0]) == path[i + 1], f"head {i}"


def test_prefix_layer_incremental_equals_full_pass():
    """Committing hidden states in padded chunks (as the decode step does) gives the same
    prefix-layer output as one causal pass over the whole sequence."""
    base = tiny_model()
    heads = random_heads(base, "hydra++")
    T = 11
    hidden = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(5))
    full = heads.summary(hidden, base)  # [2, T, D]
    state = heads.new_state(2, 40, base)
    heads.observe(state, hidden[:, :4], torch.arange(4)[None].expand(2, 4), torch.tensor([4, 4]))
    # row 0 commits 3 more, row 1 commits 5 more; the rest of each chunk is padding
    chunk = torch.zeros(2, 6, 32)
    chunk[0, :3], chunk[1, :5] = hidden[0, 4:7], hidden[1, 4:9]
    chunk[0, 3:] = 99.0  # padding garbage must not leak
    pos = 4 + torch.arange(6)[None].expand(2, 6)
    heads.observe(state, chunk, pos, torch.tensor([3, 5]))
    torch.testing.assert_close(state.last[0], full[0, 6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.last[1], full[1, 8], atol=1e-5, rtol=1e-4)
    heads.observe(state, hidden[:1, 7:].expand(2, -1, -1), (7 + torch.arange(4))[None].expand(2, 4), torch.tensor([4, 0]))
    torch.testing.assert_close(state.last[0], full[0, 10], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.last[1], full[1, 8], atol=1e-5, rtol=1e-4)  # count 0: unchanged


@pytest.mark.parametrize("head_type", ["hydra", "hydra++"])
def test_save_load_roundtrip(tmp_path, head_type):
    base = tiny_model()
    heads = random_heads(base, head_type)
    loaded = load_heads(save_heads(heads, tmp_path / head_type), base)
    assert isinstance(loaded, HydraHeads) and loaded.config == heads.config
    for (n, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.parametrize("head_type", ["medusa", "hydra++"])
def test_grown_heads_compute_what_the_old_ones_did_and_train(head_type):
    """grow_heads adds identity blocks (and, for Hydra++, prefix MLP width whose new down columns
    are zero): the teacher-forced logits, the proposals and the draft vocabulary stay the same,
    and every new weight gets a gradient."""
    from medusa.heads.io import grow_heads

    base = tiny_model()
    heads = random_heads(base, head_type, num_layers=2)
    heads.set_draft_vocab(torch.arange(0, 61, 2), base)
    width = prefix_extra(base)["prefix"]["intermediate_size"] if head_type == "hydra++" else None
    grown = grow_heads(heads, base, num_layers=4, prefix_intermediate=None if width is None else width + 16)
    assert grown.config.num_layers == 4 and torch.equal(grown.draft_vocab, heads.draft_vocab)
    if width is not None:
        assert grown.config.extra["prefix"]["intermediate_size"] == width + 16
        assert grown.prefix.mlp.up_proj.weight[width:].abs().sum() > 0  # new rows random, not dead
    hidden = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(5))
    tree = build_tree(search_tree(prior_accuracies(3, 4), 12))
    outs = []
    for h in (heads, grown):
        if head_type == "medusa":
            torch.testing.assert_close(h(hidden, base), heads(hidden, base), atol=0, rtol=0)
        else:
            torch.testing.assert_close(h.summary(hidden, base), heads.summary(hidden, base), atol=0, rtol=0)
        state = h.new_state(1, 32, base)
        h.observe(state, hidden, torch.arange(9)[None], torch.tensor([9]))
        outs.append(h.propose(state, hidden[:, -1], torch.tensor([7]), tree, base))
    assert torch.equal(outs[0], outs[1])
    # the new weights learn: gradients of a head loss reach every one of them
    grown.train().requires_grad_(True)
    s = hidden[:, -1] if head_type == "medusa" else grown.summary(hidden, base)[:, -1]
    loss = sum(grown.lm_logits(i, grown.head_hidden(i, s, base.embed_tokens(torch.tensor([[3] * (i + 1)]))) if head_type != "medusa"
                               else grown.blocks[i](s), base).logsumexp(-1).sum() for i in range(3))
    loss.backward()
    new = [n for n, _ in grown.named_parameters() if n not in dict(heads.named_parameters())]
    assert new and all(grown.get_parameter(n).grad is not None and grown.get_parameter(n).grad.abs().sum() > 0 for n in new)
    if width is not None:
        assert grown.prefix.mlp.down_proj.weight.grad[:, width:].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_heads(heads, base, num_layers=1)
    assert grow_heads(heads, base) is heads


@pytest.fixture(scope="module")
def default_model():
    from medusa.model.loading import load_model

    model, _ = load_model(device="cpu", dtype=torch.float32, progress=False)
    return model


PROMPTS = ([1, 9690, 28, 198, 2683, 314, 253, 2365, 30], [504, 3458, 282, 4649, 314])


@pytest.fixture(scope="module")
def plain_outputs(default_model):
    return [[t for c in generate(default_model, ids, max_new_tokens=12) for t in c.tokens] for ids in PROMPTS]


@pytest.mark.parametrize("head_type", ["hydra", "hydra++"])
def test_golden_speculative_greedy_equals_plain_greedy(default_model, plain_outputs, head_type):
    """Random non-zero heads (small, so that some guesses are accepted and multi-token commits
    reach the Hydra++ prefix KV) on the default model: output equals plain greedy."""
    heads = random_heads(default_model, head_type, num_heads=3, num_layers=2, std=0.02, rest_std=0.002)
    tree = build_tree(search_tree(prior_accuracies(3, 3), 8))
    produced = []
    for ids, plain in zip(PROMPTS, plain_outputs):
        stats = Stats()
        spec = [t for c in generate(default_model, ids, heads=heads, tree=tree, max_new_tokens=12, stats=stats) for t in c.tokens]
        assert spec == plain
        produced += stats.step_tokens
    assert max(produced) > 1, "no step accepted a guess: the test would not exercise multi-token commits"


@pytest.mark.parametrize("head_type", ["hydra", "hydra++"])
def test_batched_engine_with_hydra_heads_equals_plain_greedy(head_type):
    """Several requests decoded together by the engine (rows joining at different times, the
    Hydra++ prefix KV held per row) give each request its plain greedy output."""
    from medusa.decoding.engine import Engine, Request

    base = tiny_model()
    heads = random_heads(base, head_type, num_heads=3, num_layers=2, std=0.05, rest_std=0.01)
    tree = build_tree(search_tree(prior_accuracies(3, 3), 8))
    prompts = [[1, 2, 3, 4, 5], [7, 7, 7], [11, 3, 19, 23, 5, 8, 2], [40, 41]]
    plain = [[t for c in generate(base, ids, max_new_tokens=12, stop_token_ids=()) for t in c.tokens] for ids in prompts]
    engine = Engine(base, heads, tree, max_batch=3)
    handles = [engine.submit(Request(ids, max_new_tokens=12, stop_token_ids=(), speculation="on")) for ids in prompts]
    outs = [h.result() for h in handles]
    assert [tokens for tokens, _ in outs] == plain
    assert max(stats.mean_accepted for _, stats in outs) > 1.0, "no guess accepted: multi-token commits untested"


@pytest.mark.parametrize("head_type", ["hydra", "hydra++"])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_sub_tree_accepts_what_its_enclosing_tree_shows(head_type, sampled):
    """The engine measures every smaller tree inside the verified one from the accepted path
    (tree.accepted_within). That must be what the smaller tree accepts when it runs the same
    step itself, for greedy rows and for sampled rows (uniforms drawn per depth, as the engine
    draws them)."""
    import copy

    from medusa.decoding.sampling import BatchSampling, SamplingParams
    from medusa.decoding.step import prefill, speculate
    from medusa.decoding.tree import accepted_within, nodes_inside

    base = tiny_model(seed=4)
    heads = random_heads(base, head_type, std=0.6, seed=5)
    acc_table = prior_accuracies(3, 6)
    big = build_tree(search_tree(acc_table, 32), name="big")
    subs = [build_tree(p, name=n) for n, p in (("chain", chain(3)), ("t4", search_tree(acc_table, 4)),
                                               ("t8", search_tree(acc_table, 8)), ("t16", search_tree(acc_table, 16)))]
    subs = [(t, nodes_inside(big, t)) for t in subs]
    assert sum(inside is not None for _, inside in subs) >= 3
    params = SamplingParams(temperature=0.9, top_p=0.95, rule="sample") if sampled else SamplingParams()
    sampling = BatchSampling.stack([params] * 2, "cpu")
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 61, (2, 6), generator=g)
    with torch.inference_mode():
        state = prefill(base, heads, base.new_cache(2, 96), prompt, torch.zeros(2, dtype=torch.long), sampling,
                        torch.rand(2, 1, generator=g) if sampled else None)
        seen = 0
        for _ in range(12):
            per_depth = torch.rand(2, big.max_depth + 1, generator=g)  # one draw per output position
            ref = copy.deepcopy(state)
            acc = speculate(base, heads, big, state, sampling, per_depth[:, big.depth] if sampled else None)
            for t, inside in subs:
                if inside is None:
                    continue
                alone = speculate(base, heads, t, copy.deepcopy(ref), sampling, per_depth[:, t.depth] if sampled else None)
                for b in range(2):
                    n = int(acc.length[b])
                    assert accepted_within(acc.path[b, 1:1 + n].tolist(), inside) == int(alone.length[b]), (t.name, b)
                    seen += int(alone.length[b])
    assert seen > 0  # the sub-trees accepted something, so the check compared real paths


def test_prefix_layer_seen_inside_the_step_equals_observing_the_accepted_tokens(monkeypatch):
    """Hydra++ runs its prefix layer over every tree node of the verification forward (`see`, with
    the step's positions, slots and tree mask) and keeps the accepted path. Over several steps of
    two rows with different acceptances, that leaves the same prefix state (output at the last
    committed token, K/V at every committed slot) and the same proposals as `observe` over the
    accepted tokens alone."""
    import copy

    from medusa.decoding.sampling import BatchSampling, SamplingParams
    from medusa.decoding.step import prefill, speculate

    base = tiny_model(seed=0)
    heads = random_heads(base, "hydra++", std=0.6, seed=5)
    # random heads seldom guess right: every token at depth 1 and wide levels below, so that
    # steps commit 2 and 3 tokens (262 nodes: cheap at this model's size)
    tree = build_tree([[i] for i in range(61)] + [[i, j] for i in range(6) for j in range(20)]
                      + [[i, j, k] for i in range(2) for j in range(4) for k in range(10)])
    sampling = BatchSampling.stack([SamplingParams()] * 2, "cpu")
    prompt = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(11))
    calls = {"observe": 0}
    real_see, real_observe = HydraHeads.see, HydraHeads.observe

    def counted_observe(self, *a, **k):
        calls["observe"] += 1
        return real_observe(self, *a, **k)

    def by_observe(self, state, seen):
        """The reference: `observe` over the accepted tokens only, at their committed positions."""
        if seen.prompt:
            return real_see(self, state, seen)
        start = seen.slots[:, 0]
        path = seen.src - start[:, None]  # [B, A] accepted node ids (padded)
        hid = seen.hidden.gather(1, path[..., None].expand(-1, -1, seen.hidden.shape[-1]))
        count = seen.positions.gather(1, seen.last_node[:, None])[:, 0] - start + 1
        self.observe(state, hid, seen.dst, count, kv_len=seen.kv_len)

    monkeypatch.setattr(HydraHeads, "observe", counted_observe)
    with torch.inference_mode():
        fused = prefill(base, heads, base.new_cache(2, 400), prompt, torch.zeros(2, dtype=torch.long), sampling, None)
        alone = copy.deepcopy(fused)
        lengths = []
        for _ in range(8):
            monkeypatch.setattr(HydraHeads, "see", real_see)
            a = speculate(base, heads, tree, fused, sampling, None)
            monkeypatch.setattr(HydraHeads, "see", by_observe)
            b = speculate(base, heads, tree, alone, sampling, None)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(fused.start, alone.start)
            assert torch.equal(heads.propose(fused.head_state, fused.last_hidden, fused.root, tree, base),
                               heads.propose(alone.head_state, alone.last_hidden, alone.root, tree, base))
            torch.testing.assert_close(fused.head_state.last, alone.head_state.last, atol=1e-4, rtol=1e-3)
            for r in range(2):
                n = int(fused.start[r])
                torch.testing.assert_close(fused.head_state.cache.kv[:, :, r, :, :n], alone.head_state.cache.kv[:, :, r, :, :n],
                                           atol=1e-4, rtol=1e-3)
            lengths += a.length.tolist()
    assert calls["observe"] == 8  # only the reference path observes: the step's own `see` runs the layer itself
    assert max(lengths) >= 2 and min(lengths) < max(lengths), "commits of 3 tokens and of differing lengths untested"


def test_lazy_state_skips_the_prefix_layer_in_plain_steps_and_catches_up_exactly():
    """A lazy Hydra++ state (the engine's) stores what the prompt and plain steps show it: those
    never run the prefix layer. When speculation resumes, `prepare` runs it over the stored
    positions once, and the heads then propose exactly what heads that saw every step propose;
    a speculative step after that leaves both states alike."""
    from medusa.decoding.sampling import BatchSampling, SamplingParams
    from medusa.decoding.step import prefill, speculate
    from medusa.decoding.tree import load_tree

    base = tiny_model(seed=0)
    heads = random_heads(base, "hydra++", std=0.6, seed=7)
    ar, tree = load_tree("ar"), build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    sampling = BatchSampling.stack([SamplingParams()] * 2, "cpu")
    prompt = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([7, 4])  # row 1's prompt is shorter (right-padded)
    runs = {"n": 0}
    hook = heads.prefix.register_forward_hook(lambda *a: runs.__setitem__("n", runs["n"] + 1))
    with torch.inference_mode():
        lazy_hs = heads.new_state(2, 64, base, lazy=True)
        assert heads.prepare(lazy_hs, 0, [0, 0], speculating=False) == 0  # before the prompt, as the runner does
        lazy = prefill(base, heads, base.new_cache(2, 64), prompt, torch.zeros(2, dtype=torch.long), sampling, None,
                       lazy_hs, lengths)
        assert runs["n"] == 0  # the prompt was stored, not seen
        eager = prefill(base, heads, base.new_cache(2, 64), prompt, torch.zeros(2, dtype=torch.long), sampling, None,
                        None, lengths)
        for _ in range(5):
            assert heads.prepare(lazy.head_state, 0, lazy.start.tolist(), speculating=False) == 0
            runs["n"] = 0
            speculate(base, heads, ar, lazy, sampling, None)
            assert runs["n"] == 0  # a plain step: no prefix layer
            speculate(base, heads, ar, eager, sampling, None)
            assert runs["n"] == 1
            assert torch.equal(lazy.root, eager.root) and torch.equal(lazy.start, eager.start)
        runs["n"] = 0
        assert heads.prepare(lazy.head_state, 0, lazy.start.tolist(), speculating=True) == 2  # both rows were behind
        assert runs["n"] == 1  # one forward of the prefix layer caught both rows up
        torch.testing.assert_close(lazy.head_state.last, eager.head_state.last, atol=1e-4, rtol=1e-3)
        assert torch.equal(heads.propose(lazy.head_state, lazy.last_hidden, lazy.root, tree, base),
                           heads.propose(eager.head_state, eager.last_hidden, eager.root, tree, base))
        for _ in range(3):  # following now: speculative steps show the heads every node, lazy or not
            assert heads.prepare(lazy.head_state, 0, lazy.start.tolist(), speculating=True) == 0
            a, b = speculate(base, heads, tree, lazy, sampling, None), speculate(base, heads, tree, eager, sampling, None)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(lazy.start, eager.start)
            assert torch.equal(heads.propose(lazy.head_state, lazy.last_hidden, lazy.root, tree, base),
                               heads.propose(eager.head_state, eager.last_hidden, eager.root, tree, base))
    hook.remove()
