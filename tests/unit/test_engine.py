"""The batched engine: every request of a batch decodes exactly as it would alone (greedy rows
token for token, seeded sampled rows draw for draw), requests join and leave mid-flight,
cancellation frees rows, a full pool queues, sessions reuse their KV with identical output."""
from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from medusa.decoding.engine import Engine, Request
from medusa.decoding.generate import generate
from medusa.decoding.sampling import SamplingParams
from medusa.decoding.tree import build_tree, chain, load_tree
from medusa.errors import RequestError
from medusa.heads.base import HeadsConfig
from medusa.heads.hydra import prefix_extra
from medusa.heads.io import build_heads, fingerprint
from medusa.model.config import ModelConfig
from medusa.model.llama import Transformer

EOS = 23
GREEDY = SamplingParams()


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=24, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=160, eos_token_ids=(EOS,))
    m = Transformer(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return m.eval().requires_grad_(False)


def random_heads(base, head_type: str = "medusa", num_heads: int = 3, seed: int = 1):
    extra = prefix_extra(base) if head_type == "hydra++" else {}
    cfg = HeadsConfig(head_type, num_heads, 1, base.cfg.hidden_size, base.cfg.vocab_size, fingerprint(base), extra=extra)
    heads = build_heads(cfg, base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if "layernorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return heads.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module", params=["medusa", "hydra++"])
def tiny_heads(request, tiny):
    return random_heads(tiny, request.param)


TREE7 = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
# "lookup": tree7 and a 5-node lookup chain, deeper than the heads guess (random tiny models loop, so it is accepted)
TREES = {"chain": build_tree(chain(3), "chain3"), "tree": build_tree(TREE7, "tree7"),
         "lookup": build_tree(TREE7, "tree7+lookup5", lookup=5)}


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(EOS) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(model, ids, heads=None, tree=None, n=16, stop=(EOS,)):
    return [t for c in generate(model, ids, heads=heads, tree=tree, max_new_tokens=n, stop_token_ids=stop) for t in c.tokens]


def drain(engine: Engine, handles) -> list[tuple[list[int], object]]:
    return [h.result() for h in handles]


# ------------------------------------------------------------------ batched == alone

@pytest.mark.parametrize("prefill_tokens", [0, 4096])  # 4096: also prefills admitted requests together
@pytest.mark.parametrize("tree", ["chain", "tree", "lookup"])
def test_batched_greedy_equals_alone(tiny, tiny_heads, tree, prefill_tokens):
    """Mixed prompt lengths, mixed sampling (sampled rows ride along), mixed speculation switches.
    Every step runs at the fixed shape the GPU captures as CUDA graphs (batch buckets 1, 2, 4, 6:
    as rows finish, idle rows pad the batch)."""
    t = TREES[tree]
    eng = Engine(tiny, tiny_heads, t, max_batch=6, max_seq_len=64, trees={t.name: t}, prefill_tokens=prefill_tokens)
    ps = prompts(6, seed=1)
    modes = ["on", "on", "off", "on", "on", "off"]
    sampled = {1: SamplingParams(temperature=0.8, top_k=5, rule="sample", seed=3),
               4: SamplingParams(temperature=1.0, top_p=0.9, rule="typical", seed=4)}
    hs = [eng.submit(Request(p, max_new_tokens=20, sampling=sampled.get(i, GREEDY), speculation=modes[i]))
          for i, p in enumerate(ps)]
    res = drain(eng, hs)
    accepted = 0.0
    for i, (p, (out, st)) in enumerate(zip(ps, res)):
        assert st.prompt_tokens == len(p) and st.new_tokens == len(out) <= 20
        if i in sampled:
            continue
        assert out == alone(tiny, p, tiny_heads, t, 20), f"row {i}"
        if modes[i] == "off":
            assert st.mean_accepted == (1.0 if st.steps else 0.0)
        else:
            accepted = max(accepted, st.mean_accepted)
    if tiny_heads.config.head_type == "medusa":  # these random Medusa heads are often right: commits are exercised
        assert accepted > 1.0
    assert eng.stats()["running"] == 0 and eng.load() == 0


def test_sampled_rows_do_not_depend_on_batchmates_or_speculation(tiny, tiny_heads):
    t = TREES["tree"]
    ps = prompts(4, seed=2)
    sp = SamplingParams(temperature=0.9, rule="sample", seed=11)

    def run(batch, mode):
        eng = Engine(tiny, tiny_heads, t, max_batch=4, max_seq_len=64, trees={t.name: t})
        others = [eng.submit(Request(p, max_new_tokens=12)) for p in ps[1:batch]]
        h = eng.submit(Request(ps[0], max_new_tokens=12, sampling=sp, speculation=mode))
        out = h.result()[0]
        drain(eng, others)
        return out

    ref = run(1, "off")
    assert run(4, "off") == ref
    assert run(4, "on") == ref  # token j always draws uniform j: speculation changes no sample


def test_default_model_batched_equals_alone(stack):
    """The embedded default model (float32) with its default heads, real chat prompts."""
    tok, model, heads = stack.tokenizer, stack.model, stack.heads
    ps = [tok.encode_prompt(x) for x in ("What is 2 + 2?", "Name a color.", "Say hello in French, briefly please.")]
    tree = load_tree("chain")
    eos = tuple(model.cfg.eos_token_ids)
    eng = Engine(model, heads, tree, max_batch=3, max_seq_len=128)
    hs = [eng.submit(Request(p, max_new_tokens=6, speculation=m)) for p, m in zip(ps, ("on", "off", "auto"))]
    for p, (out, st) in zip(ps, drain(eng, hs)):
        assert out == alone(model, p, heads, tree, 6, eos)


# ------------------------------------------------------------------ continuous batching

@pytest.mark.parametrize("prefill_tokens", [0, 4096])  # 4096: also prefills admitted requests together
def test_requests_join_and_leave_mid_flight(tiny, tiny_heads, prefill_tokens):
    t = TREES["tree"]
    eng = Engine(tiny, tiny_heads, t, max_batch=3, max_seq_len=64, trees={t.name: t}, prefill_tokens=prefill_tokens)
    ps = prompts(5, seed=3)
    lengths = [4, 24, 9, 16, 6]
    hs = {0: eng.submit(Request(ps[0], max_new_tokens=lengths[0], speculation="on"))}
    eng.step()
    eng.step()
    hs[1] = eng.submit(Request(ps[1], max_new_tokens=lengths[1], speculation="on"))
    eng.step()
    hs[2] = eng.submit(Request(ps[2], max_new_tokens=lengths[2], speculation="off"))
    for _ in range(3):
        eng.step()
    hs[3] = eng.submit(Request(ps[3], max_new_tokens=lengths[3], speculation="on"))
    hs[4] = eng.submit(Request(ps[4], max_new_tokens=lengths[4], speculation="on"))
    while eng.step():
        pass
    for i, h in hs.items():
        out, st = h.result()
        assert out == alone(tiny, ps[i], tiny_heads, t, lengths[i]), f"request {i}"


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (0, 1, 2)])
def test_a_request_ending_at_its_first_token_keeps_its_batchmates_kv(tiny, order):
    """prompts(3, seed=5)[0] ends at its first token (EOS), before the requests admitted with it
    emitted theirs: its row's release swaps the last row in, which must carry the prefilled KV
    (the row lengths were recorded only at emission, so a swap copied none of it)."""
    ps = prompts(3, seed=5)
    assert alone(tiny, ps[0], n=8) == [EOS]
    eng = Engine(tiny, None, None, max_batch=4, max_seq_len=64)
    hs = {i: eng.submit(Request(ps[i], max_new_tokens=16)) for i in order}
    for i, h in hs.items():
        assert h.result()[0] == alone(tiny, ps[i], n=16), f"prompt {i}"


def test_stop_sequences_and_eos(tiny):
    eng = Engine(tiny, None, max_batch=4, max_seq_len=64)
    p = prompts(1, seed=4)[0]
    free = alone(tiny, p, n=30, stop=())
    stop = tuple(free[5:7])
    out, st = eng.submit(Request(p, max_new_tokens=30, stop_token_ids=(), stop_sequences=(stop,))).result()
    first = next(i for i in range(1, len(free)) if tuple(free[i - 1:i + 1]) == stop)
    assert out == free[:first + 1]
    h = eng.submit(Request(p, max_new_tokens=30, stop_token_ids=(free[3],)))
    events = list(h)
    assert events[-1].finish_reason == "eos" and sum((e.tokens for e in events), []) == free[:free.index(free[3]) + 1]


# ------------------------------------------------------------------ pool, waiting, cancellation

def test_pool_exhaustion_waits(tiny, tiny_heads):
    t = TREES["chain"]
    eng = Engine(tiny, tiny_heads, t, max_batch=2, max_seq_len=64, trees={t.name: t})
    ps = prompts(5, seed=5)
    hs = [eng.submit(Request(p, max_new_tokens=8, stop_token_ids=())) for p in ps]
    eng.step()
    s = eng.stats()
    assert s["running"] == 2 and s["waiting"] == 3 and s["kv_rows_free"] == 0 and eng.load() == 5
    for p, (out, st) in zip(ps, drain(eng, hs)):
        assert out == alone(tiny, p, tiny_heads, t, 8, stop=())
    assert eng.stats()["kv_rows_free"] == 2


def test_cancel_frees_rows_without_leaks(tiny, tiny_heads):
    t = TREES["tree"]
    eng = Engine(tiny, tiny_heads, t, max_batch=3, max_seq_len=64, trees={t.name: t})
    rng = random.Random(0)
    handles = []
    for i, p in enumerate(prompts(40, seed=6)):
        handles.append(eng.submit(Request(p, max_new_tokens=30, session_id=f"s{i % 5}")))
        if rng.random() < 0.5:
            eng.step()
        victim = rng.choice(handles)
        victim.cancel()
        assert eng.pool.n_active <= 3
    keep = eng.submit(Request(prompts(1, seed=7)[0], max_new_tokens=6))
    for h in handles:
        events = list(h)
        assert events[-1].finish_reason in ("cancelled", "length", "eos")
    out, _ = keep.result()
    assert out == alone(tiny, prompts(1, seed=7)[0], tiny_heads, t, 6)
    s = eng.stats()
    assert s["running"] == 0 and s["waiting"] == 0 and eng.load() == 0
    assert s["kv_rows_used"] == 0 and s["kv_rows_free"] + s["kv_rows_kept"] == s["kv_rows"]


def test_cancel_running_frees_row_at_once(tiny):
    eng = Engine(tiny, None, max_batch=1, max_seq_len=64)
    a = eng.submit(Request(prompts(1)[0], max_new_tokens=40))
    b = eng.submit(Request(prompts(1, seed=1)[0], max_new_tokens=5))
    eng.step()
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1
    a.cancel()
    assert eng.stats()["running"] == 0 and eng.stats()["kv_rows_free"] == 1
    assert list(a)[-1].finish_reason == "cancelled"
    assert b.result()[0] == alone(tiny, prompts(1, seed=1)[0], n=5)


# ------------------------------------------------------------------ sessions

def test_session_reuse_same_tokens_as_full_prefill(tiny, tiny_heads):
    t = TREES["tree"]
    eng = Engine(tiny, tiny_heads, t, max_batch=2, max_seq_len=96, trees={t.name: t})
    p1 = prompts(1, seed=8)[0]
    ans1, st1 = eng.submit(Request(p1, max_new_tokens=10, session_id="t/a", speculation="on")).result()
    assert st1.reused_tokens == 0 and eng.stats()["sessions_kept"] == 1
    p2 = p1 + ans1 + [3, 1, 4]
    ans2, st2 = eng.submit(Request(p2, max_new_tokens=10, session_id="t/a", speculation="on")).result()
    assert st2.reused_tokens >= len(p1) + len(ans1) - 1
    assert ans2 == alone(tiny, p2, tiny_heads, t, 10)
    # a prompt that does not continue the session: full prefill, same output as alone
    p3 = [5] + p2[1:]
    ans3, st3 = eng.submit(Request(p3, max_new_tokens=10, session_id="t/a", speculation="on")).result()
    assert st3.reused_tokens == 0
    assert ans3 == alone(tiny, p3, tiny_heads, t, 10)


def test_padding_rows_keep_their_session_kv(tiny, tiny_heads):
    """A kept session's row pads a fixed-shape step (3 running rows in a bucket of 4) for a whole
    turn of other requests; its next turn still reuses the KV and decodes as it would alone."""
    t = TREES["tree"]
    eng = Engine(tiny, tiny_heads, t, max_batch=4, max_seq_len=96, trees={t.name: t}, prefill_tokens=4096)
    p1 = prompts(1, seed=12)[0]
    ans1, _ = eng.submit(Request(p1, max_new_tokens=10, session_id="t/k", speculation="on")).result()
    others = prompts(3, seed=13)
    hs = [eng.submit(Request(p, max_new_tokens=24, speculation="on", stop_token_ids=())) for p in others]
    eng.step()
    assert eng.pool.session[3] == "t/k" and eng.pool.n_active == 3  # the kept row is the padding row
    for p, (out, _) in zip(others, drain(eng, hs)):
        assert out == alone(tiny, p, tiny_heads, t, 24, stop=())
    p2 = p1 + ans1 + [3, 1, 4]
    ans2, st2 = eng.submit(Request(p2, max_new_tokens=10, session_id="t/k", speculation="on")).result()
    assert st2.reused_tokens >= len(p1) + len(ans1) - 1
    assert ans2 == alone(tiny, p2, tiny_heads, t, 10)


def test_grouped_prefill_mixes_reused_prefixes_and_lengths(tiny, tiny_heads, monkeypatch):
    """Requests admitted together prefill in one padded forward, each row with its own reused
    session prefix and prompt length, and decode as they would alone."""
    import medusa.decoding.runner as runner_mod

    t = TREES["tree"]
    eng = Engine(tiny, tiny_heads, t, max_batch=4, max_seq_len=96, trees={t.name: t}, prefill_tokens=4096)
    first = prompts(2, seed=15)
    answers = [eng.submit(Request(p, max_new_tokens=8, session_id=f"g{i}", stop_token_ids=())).result()[0]
               for i, p in enumerate(first)]
    nxt = [first[0] + answers[0] + [1, 2], first[1] + answers[1] + [3, 4, 5, 6, 7, 8, 9], prompts(1, seed=16)[0]]
    calls = []
    real = runner_mod.prefill
    monkeypatch.setattr(runner_mod, "prefill", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))
    hs = [eng.submit(Request(p, max_new_tokens=12, session_id=f"g{i}", stop_token_ids=(), speculation="on"))
          for i, p in enumerate(nxt)]
    res = drain(eng, hs)
    assert calls == [(3, max(len(nxt[0]) - res[0][1].reused_tokens, len(nxt[1]) - res[1][1].reused_tokens, len(nxt[2])))]
    assert res[0][1].reused_tokens > 0 and res[1][1].reused_tokens > 0 and res[2][1].reused_tokens == 0
    for p, (out, _) in zip(nxt, res):
        assert out == alone(tiny, p, tiny_heads, t, 12, stop=())


def test_admitted_prompts_prefill_sorted_by_length_in_the_cheapest_split(tiny, monkeypatch):
    """Prompts admitted together are sorted by length and cut into forwards by plan_groups: short
    ones share a short bucket instead of padding to the longest; output is unchanged."""
    from medusa.decoding.staging import PrefillStage

    eng = Engine(tiny, None, max_batch=8, max_seq_len=96, prefill_tokens=512)
    shapes = []
    real = PrefillStage.run
    monkeypatch.setattr(PrefillStage, "run", lambda self, t, *a, **k: shapes.append(tuple(t.shape)) or real(self, t, *a, **k))
    short, long = prompts(6, seed=31, lo=4, hi=12), prompts(2, seed=32, lo=70, hi=80)
    ps = [long[0], *short[:3], long[1], *short[3:]]  # arrival order mixes them
    hs = [eng.submit(Request(p, max_new_tokens=6, stop_token_ids=())) for p in ps]
    res = drain(eng, hs)
    # all eight in one forward would be 8 x 96 slots, over the capacity; arrival order would pad
    # short prompts to 96 beside the long ones
    assert shapes == [(6, max(map(len, short))), (2, max(map(len, long)))]
    assert eng.stats()["prefill_forwards"] == 2
    for p, (out, _) in zip(ps, res):
        assert out == alone(tiny, p, n=6, stop=())


def test_kept_sessions_are_bounded_below_the_context_end(tiny):
    """A session kept at the end of the context keeps at most keep_cap tokens (so a padding row's
    tree stays inside the cache and the model's positions); its next turn still decodes right."""
    eng = Engine(tiny, None, max_batch=2, max_seq_len=160)  # max positions 160
    assert eng.keep_cap == 160 - 1 - 1  # plain decoding only: a 1-node tree
    p1 = prompts(1, seed=14, lo=140, hi=150)[0]
    ans1, _ = eng.submit(Request(p1, max_new_tokens=16, stop_token_ids=(), session_id="s")).result()
    assert eng.pool.length[eng.pool.lru["s"]] == min(len(p1) + len(ans1) - 1, eng.keep_cap)
    p2 = (p1 + ans1)[:158]
    out, st = eng.submit(Request(p2, max_new_tokens=2, session_id="s")).result()
    assert st.reused_tokens == min(len(p2) - 1, eng.keep_cap)
    assert out == alone(tiny, p2, n=2)


def test_warmup_measures_step_costs_so_auto_never_explores(tiny, tiny_heads):
    """Engine.warmup times a step of every batch bucket x tree on idle rows (skipping trees that
    cannot beat plain decoding) and hands the times to the policy; requests then decode with no
    step spent exploring, and exactly as they would alone."""
    t = TREES["tree"]
    eng = Engine(tiny, tiny_heads, t, max_batch=4, max_seq_len=64, trees={"chain3": TREES["chain"], t.name: t})
    eng.warmup()
    assert {(1, 1), (2, 1), (4, 1)} <= set(eng.cost.seeded)  # plain decoding timed at every bucket
    assert all(eng.cost(b, 1) > 0 for b in (1, 2, 4))
    reasons = []
    ps = prompts(4, seed=17)
    hs = [eng.submit(Request(p, max_new_tokens=12, stop_token_ids=())) for p in ps]
    while eng.step():
        reasons.append(eng.stats()["speculation"]["reason"])
    assert reasons and not any("exploring" in r for r in reasons)
    for p, (out, _) in zip(ps, drain(eng, hs)):
        assert out == alone(tiny, p, tiny_heads, t, 12, stop=())


def test_plain_steps_keep_the_heads_observation_pending_without_changing_proposals(tiny, monkeypatch):
    """With Hydra++ heads, the engine's lazy head state stores what eager prefills and plain steps
    show it instead of running the prefix layer; before a speculative step the heads catch up
    (heads.prepare, outside the step). The proposals, hence accepted lengths, equal those of an
    engine whose heads observe every step, and the lazy engine runs the prefix layer less."""
    import medusa.decoding.engine.policy as engine_mod
    from medusa.decoding.adaptive import Choice

    heads = random_heads(tiny, "hydra++", seed=3)
    t = TREES["tree"]
    turn = {"n": 0}

    def alternate(batch, speculating, options, cost, margin=0.0):  # plain, plain, tree, plain, plain, tree, ...
        turn["n"] += 1
        return Choice("tree7" if turn["n"] % 3 == 0 else "ar", 0.0, "test", {})

    monkeypatch.setattr(engine_mod, "choose_tree", alternate)
    ps = prompts(5, seed=18)
    proposals = []
    propose = heads.propose

    def spy(*args, **kwargs):
        cand = propose(*args, **kwargs)
        proposals.append(cand.tolist())
        return cand

    monkeypatch.setattr(heads, "propose", spy)
    prefix_tokens = {"n": 0}  # tokens the prefix layer ran over
    hook = heads.prefix.register_forward_hook(lambda mod, args, out: prefix_tokens.__setitem__(
        "n", prefix_tokens["n"] + out.shape[0] * out.shape[1]))

    def run(lazy: bool):
        turn["n"] = 0
        proposals.clear()
        prefix_tokens["n"] = 0
        eng = Engine(tiny, heads, t, max_batch=3, max_seq_len=96, trees={t.name: t})
        if not lazy:  # the same engine with a head state that observes at once
            eng.head_state = heads.new_state(eng.pool.rows, eng.row_len, tiny)
            eng.runner.rows = dataclasses.replace(eng.runner.rows, head_state=eng.head_state)
        hs = [eng.submit(Request(p, max_new_tokens=n, stop_token_ids=(), session_id=f"d{i}"))
              for i, (p, n) in enumerate(zip(ps, (18, 18, 6, 9, 12)))]  # rows finish apart: later prompts join
        res = drain(eng, hs)
        nxt = ps[0] + res[0][0] + [4, 2]
        res.append(eng.submit(Request(nxt, max_new_tokens=18, stop_token_ids=(), session_id="d0")).result())
        return res, nxt, list(proposals), eng.stats()["catch_ups"], prefix_tokens["n"]

    lazy, nxt, prop_lazy, caught, ran_lazy = run(True)
    assert caught > 0  # speculation resumed after plain steps
    eager, _, prop_eager, caught_eager, ran_eager = run(False)
    hook.remove()
    assert caught_eager == 0 and ran_lazy < ran_eager
    assert len(prop_lazy) > 3 and prop_lazy == prop_eager  # the draft heads proposed the very same candidates
    for (out_l, st_l), (out_e, st_e) in zip(lazy, eager):
        assert out_l == out_e and st_l.steps == st_e.steps and st_l.mean_accepted == pytest.approx(st_e.mean_accepted)
    assert lazy[-1][1].reused_tokens > 0
    for p, n, (out, _) in zip(ps + [nxt], (18, 18, 6, 9, 12, 18), lazy):
        assert out == alone(tiny, p, heads, t, n, stop=())


def test_admissions_coalesce_while_rows_run(tiny):
    """With rows running, a lone arrival waits (up to admit_wait_steps steps, or until
    admit_group requests wait) so that arrivals share one prefill forward; output is unchanged."""
    eng = Engine(tiny, None, max_batch=16, max_seq_len=64, prefill_tokens=4096, admit_wait_steps=3)
    assert eng.admit_group == 4
    ps = prompts(6, seed=19)
    a = eng.submit(Request(ps[0], max_new_tokens=30, stop_token_ids=()))
    eng.step()
    assert eng.pool.n_active == 1  # nothing runs: admitted at once
    b = eng.submit(Request(ps[1], max_new_tokens=10, stop_token_ids=()))
    for _ in range(3):
        eng.step()
        assert eng.pool.n_active == 1 and eng.stats()["waiting"] == 1
    eng.step()  # sat through 3 steps: admitted
    assert eng.pool.n_active == 2
    more = [eng.submit(Request(p, max_new_tokens=10, stop_token_ids=())) for p in ps[2:]]
    eng.step()  # four waiting = admit_group: admitted together, one prefill forward
    assert eng.pool.n_active == 6 and eng.stats()["prefill_forwards"] == 3
    for p, h, n in zip(ps, [a, b, *more], (30, 10, 10, 10, 10, 10)):
        assert h.result()[0] == alone(tiny, p, n=n, stop=())


def test_a_deep_queue_waits_for_room_to_admit_a_group(tiny):
    """Many requests waiting but one free row: rows freed one at a time are admitted in groups
    of admit_group (or after admit_wait_steps), not one prefill forward each."""
    eng = Engine(tiny, None, max_batch=8, max_seq_len=64, prefill_tokens=4096, admit_wait_steps=50)
    assert eng.admit_group == 2
    ps = prompts(12, seed=21)
    hs = [eng.submit(Request(p, max_new_tokens=4 + i, stop_token_ids=())) for i, p in enumerate(ps)]  # finish one by one
    eng.step()
    assert eng.pool.n_active == 8
    while eng.step():
        pass
    # every admission while rows ran took two requests at once
    assert eng.stats()["prefill_forwards"] == 1 + 2
    for i, (p, h) in enumerate(zip(ps, hs)):
        assert h.result()[0] == alone(tiny, p, n=4 + i, stop=())


def test_session_evicted_lru_falls_back(tiny):
    eng = Engine(tiny, None, max_batch=1, kv_budget_tokens=2 * 48, max_seq_len=48)  # 2 rows, 1 running
    ps = prompts(3, seed=9, hi=10)
    answers = [eng.submit(Request(p, max_new_tokens=6, session_id=f"s{i}")).result()[0] for i, p in enumerate(ps)]
    assert eng.stats()["sessions_kept"] == 2  # s0 was evicted (least recent) to make room for s2
    nxt = ps[0] + answers[0] + [2]
    out, st = eng.submit(Request(nxt, max_new_tokens=6, session_id="s0")).result()
    assert st.reused_tokens == 0 and out == alone(tiny, nxt, n=6)  # s1 evicted now
    nxt = ps[2] + answers[2] + [2]
    out, st = eng.submit(Request(nxt, max_new_tokens=6, session_id="s2")).result()
    assert st.reused_tokens == len(ps[2]) + len(answers[2]) - 1 and out == alone(tiny, nxt, n=6)


# ------------------------------------------------------------------ API surface

def test_background_thread_and_async_iteration(tiny, tiny_heads):
    t = TREES["chain"]
    ps = prompts(3, seed=10)

    async def consume(eng):
        hs = [eng.submit(Request(p, max_new_tokens=8)) for p in ps]
        outs = []
        for h in hs:
            toks = []
            async for ev in h:
                toks.extend(ev.tokens)
            outs.append(toks)
        return outs

    with Engine(tiny, tiny_heads, t, max_batch=2, max_seq_len=64, trees={t.name: t}) as eng:
        outs = asyncio.run(consume(eng))
        outs.append(eng.submit(Request(ps[0], max_new_tokens=8)).result()[0])  # blocking iteration
    assert outs[:3] == [alone(tiny, p, tiny_heads, t, 8) for p in ps]
    assert outs[3] == outs[0]
    sync = Engine(tiny, tiny_heads, t, max_batch=2, max_seq_len=64, trees={t.name: t})  # no thread: iteration drives it
    assert asyncio.run(consume(sync)) == outs[:3]


def test_bad_requests_are_request_errors(tiny):
    eng = Engine(tiny, None, max_batch=1, max_seq_len=32)
    for bad in (Request([]), Request([1, 99]), Request([1], max_new_tokens=0), Request([1] * 30, max_new_tokens=5),
                Request([1], speculation="maybe"), Request([1], stop_sequences=((),))):
        with pytest.raises(RequestError):
            eng.submit(bad)
    h = eng.submit(Request([1, 2], request_id="x", max_new_tokens=20))
    with pytest.raises(RequestError):
        eng.submit(Request([1, 2], request_id="x"))
    h.cancel()
    assert eng.load() == 0


def test_generate_concurrency_matches_one_at_a_time(capsys, tmp_path):
    """`medusa generate --concurrency N`: the same JSON objects, in input order, as one at a time."""
    import json

    from medusa.cli import main

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(["Hi!", "Name a fruit.", "2+2=?"])))
    runs = []
    for extra in ([], ["--concurrency", "2"]):
        assert main(["generate", "--prompt-file", str(f), "--json", "--max-new-tokens", "6", "--mode", "ar", *extra]) == 0
        runs.append([json.loads(x) for x in capsys.readouterr().out.splitlines()])
    assert [r["id"] for r in runs[1]] == ["0", "1", "2"]
    assert [r["token_ids"] for r in runs[1]] == [r["token_ids"] for r in runs[0]]
    assert main(["generate", "--prompt-file", str(f), "--concurrency", "0"]) == 2


@pytest.mark.parametrize("n", [1, 10])
def test_a_batch_keeps_its_tree_choice_a_few_steps(tiny, monkeypatch, n):
    """The policy is worked out once per CHOICE_STEPS steps while the batch size holds (host
    time per step), and again at once when the batch size changes."""
    import medusa.decoding.engine.policy as engine_mod
    from medusa.decoding.adaptive import Choice

    heads = random_heads(tiny, "medusa")
    t = TREES["tree"]
    calls = []

    def counting(batch, *args, **kwargs):  # plain decoding wins, on measured figures
        calls.append(batch)
        return Choice("ar", 100.0, "test: plain wins", {"ar": 100.0, t.name: 50.0})

    monkeypatch.setattr(engine_mod, "choose_tree", counting)
    eng = Engine(tiny, heads, t, max_batch=n, max_seq_len=96, trees={t.name: t})
    hs = [eng.submit(Request(p, max_new_tokens=40, stop_token_ids=())) for p in prompts(n, seed=4)]
    drain(eng, hs)
    full = calls.count(n)
    assert 40 // engine_mod.CHOICE_STEPS <= full <= 40 // engine_mod.CHOICE_STEPS + 1
    assert eng.stats()["steps"] == 39  # the first token comes from the prefill


def test_acceptance_priors_come_from_the_heads_accuracy_table(tiny):
    """Heads that ship their held-out accuracy table (heads.json "rank_accuracy") give the policy
    each tree's expected acceptance before any is measured; others get the generic profile."""
    from medusa.decoding.tree import expected_accept_length, prior_accuracies

    heads = random_heads(tiny, "medusa")
    t = TREES["tree"]
    plain = Engine(tiny, heads, t, max_batch=2, max_seq_len=64, trees={t.name: t})
    assert plain.stats()["acceptance"][t.name] == round(expected_accept_length(t.paths, prior_accuracies(3)), 3)
    table = [[0.5, 0.2], [0.4, 0.1], [0.3, 0.1]]
    heads.config.extra["rank_accuracy"] = table
    try:
        eng = Engine(tiny, heads, t, max_batch=2, max_seq_len=64, trees={t.name: t})
    finally:
        del heads.config.extra["rank_accuracy"]
    # tree7: (0,) (1,) (0,0) (0,1) (1,0) (0,0,0) -> 1 + .5 + .2 + .5*.4 + .5*.1 + .2*.4 + .5*.4*.3
    assert eng.stats()["acceptance"][t.name] == pytest.approx(1 + .5 + .2 + .2 + .05 + .08 + .06, abs=1e-3)


def test_speculating_engine_re_measures_plain_cost_now_and_then(tiny, monkeypatch):
    """While speculation wins, one plain step per REFRESH_EVERY steps (and one on a batch size's
    first speculative step) keeps plain decoding's cost measured rather than estimated."""
    import medusa.decoding.engine.policy as engine_mod

    from medusa.decoding.adaptive import Choice

    monkeypatch.setattr(engine_mod, "REFRESH_EVERY", 6)
    heads = random_heads(tiny, "medusa")
    t = TREES["chain"]
    monkeypatch.setattr(engine_mod, "choose_tree", lambda *a, **k: Choice(t.name, 1.0, "test: the tree wins", {}))
    eng = Engine(tiny, heads, t, max_batch=2, max_seq_len=96, trees={t.name: t})
    for h in [eng.submit(Request(p, max_new_tokens=40, stop_token_ids=())) for p in prompts(2, seed=8)]:
        h.result()
    st = eng.stats()
    plain, spec = st["steps_by_tree"].get("ar", 0), st["steps_by_tree"].get(t.name, 0)
    assert spec > plain >= 1 and abs(plain - st["steps"] / 6) <= 2


def test_a_step_measures_the_trees_inside_its_tree(tiny, tiny_heads):
    """Steps over a tree also measure the acceptance of the smaller trees it holds (on the same
    tokens), never one it does not hold; each measurement lies within what the sub-tree can accept."""
    big = TREES["tree"]  # tree7 holds chain (0,), (0, 0), (0, 0, 0) and the 2-node tree (0,)
    inner = {"chain3": TREES["chain"], "pair": build_tree([(0,)], "pair"), "other": build_tree([(2,)], "other")}
    eng = Engine(tiny, tiny_heads, big, max_batch=3, max_seq_len=64, trees={big.name: big, **inner})
    drain(eng, [eng.submit(Request(p, max_new_tokens=16, speculation="on")) for p in prompts(3, seed=4)])
    counts = eng.meter.count
    assert counts.get("tree7", 0) > 0 and counts.get("chain3") == counts["tree7"] == counts.get("pair")
    assert "other" not in counts  # (2,) is not a path of tree7
    assert 1.0 <= eng.meter.mean["pair"] <= 2.0 and 1.0 <= eng.meter.mean["chain3"] <= eng.meter.mean["tree7"]


def test_lookup_chain_in_the_engine(tiny, tiny_heads):
    """A lookup tree: greedy rows equal their lone decodes and accept past the heads' depth (the
    chain is 5 deep, the heads 3); a step with a sampled row runs the heads' nodes alone."""
    t = TREES["lookup"]
    eng = Engine(tiny, tiny_heads, t, max_batch=4, max_seq_len=96, trees={t.name: t})
    assert "tree7" in eng.trees  # the lookup tree's heads' nodes, for steps with sampled rows
    ps = prompts(3, seed=5)
    hs = [eng.submit(Request(p, max_new_tokens=40, speculation="on")) for p in ps]
    deepest = 0
    for p, h in zip(ps, hs):
        out = []
        for ev in h:
            out += ev.tokens
            deepest = max(deepest, len(ev.tokens))
        assert out == alone(tiny, p, tiny_heads, t, 40)
    assert deepest > 1 + 3  # more tokens in one step than the heads could give
    sp = SamplingParams(temperature=0.9, rule="sample", seed=2)
    before = dict(eng.policy.tree_steps)
    h = eng.submit(Request(ps[0], max_new_tokens=8, sampling=sp, speculation="on", stop_token_ids=()))  # no EOS: it steps
    assert len(h.result()[0]) == 8
    assert eng.policy.tree_steps["tree7"] > before.get("tree7", 0) and eng.policy.tree_steps["tree7+lookup5"] == before["tree7+lookup5"]


def test_sampled_generate_drops_the_lookup_chain(tiny, tiny_heads):
    """A sampled request decodes a lookup tree's heads' nodes alone (sibling nodes with equal tokens
    would bias the draws): the same tokens as with that tree, seed for seed."""
    sp = SamplingParams(temperature=0.9, rule="sample", seed=7)
    p = prompts(1, seed=6)[0]

    def run(tree):
        return [t for c in generate(tiny, p, heads=tiny_heads, tree=tree, params=sp, max_new_tokens=24) for t in c.tokens]

    assert run(TREES["lookup"]) == run(TREES["tree"])


def test_steps_without_the_lookup_chain_measure_it_too(tiny, tiny_heads):
    """The engine runs tree7 (speculation on) while tree7+lookup5 is also among its trees: every
    resolved step records the lookup tree at the longer of the chain's and the heads' acceptance,
    on the same tokens, so it is never below tree7's own measurement of those steps."""
    base, look = TREES["tree"], TREES["lookup"]
    eng = Engine(tiny, tiny_heads, base, max_batch=2, max_seq_len=96, trees={base.name: base, look.name: look})
    assert eng.policy.twin == {"tree7": eng.trees["tree7+lookup5"]}
    drain(eng, [eng.submit(Request(p, max_new_tokens=40, speculation="on")) for p in prompts(2, seed=5)])
    c, m = eng.meter.count, eng.meter.mean
    assert eng.policy.tree_steps["tree7+lookup5"] == 0 and eng.policy.tree_steps["tree7"] > 0  # the chain itself never ran
    assert 0 < c["tree7+lookup5"] <= c["tree7"]  # steps near each request's end stay unresolved
    assert m["tree7+lookup5"] > m["tree7"]  # these random models loop: the chain accepts more


def test_stats_count_acceptance_per_draft_position_and_queue_seconds(tiny, tiny_heads):
    """Engine.stats()["accepted_per_pos"][i]: speculative row-steps that accepted a draft token at
    position i (so non-increasing in i, summing to every accepted draft); RequestStats.queue_s:
    submit to admission, within the time to the first token."""
    t = TREES["chain"]
    eng = Engine(tiny, tiny_heads, t, max_batch=2, max_seq_len=96, trees={t.name: t})
    hs = [eng.submit(Request(p, max_new_tokens=20, stop_token_ids=(), speculation="on")) for p in prompts(3, seed=5)]
    stats = [h.result()[1] for h in hs]
    per_pos = eng.stats()["accepted_per_pos"]
    accepted = sum(round(s.mean_accepted * s.steps) - s.steps for s in stats)
    assert accepted > 0 and sum(per_pos) == accepted
    assert len(per_pos) <= t.accept_depth and per_pos == sorted(per_pos, reverse=True)
    assert all(0 <= s.queue_s <= s.ttft_s for s in stats)
    assert stats[2].queue_s > max(s.ttft_s for s in stats[:2])  # the third waited for a row to free


def test_a_row_never_inherits_a_finished_requests_sampling(tiny, tiny_heads):
    """Requests one after another in one row alternate greedy and sampled. Each one's tokens equal
    its run in an engine of its own: a new request's sampling parameters are loaded even where
    it lands in the row of a finished one (whose record Python may reuse the memory of)."""
    t = TREES["lookup"]
    eng = Engine(tiny, tiny_heads, t, max_batch=1, max_seq_len=96, trees={t.name: t})
    p = prompts(1, seed=8)[0]
    sp = SamplingParams(temperature=0.9, rule="sample", seed=3)

    def request(i):
        return Request(p, max_new_tokens=12, sampling=sp if i % 2 else GREEDY, speculation="on", stop_token_ids=())

    def fresh(i):
        e = Engine(tiny, tiny_heads, t, max_batch=1, max_seq_len=96, trees={t.name: t})
        return e.submit(request(i)).result()[0]

    want = [fresh(0), fresh(1)]
    for i in range(16):
        assert eng.submit(request(i)).result()[0] == want[i % 2], f"request {i}"
