"""Tensor parallelism on the CPU (gloo, float32): ranks are spawned inside the tests.

- the default model (9 heads, 3 KV heads) at TP 3 through the one Engine (medusa.parallel.replica:
  rank 0 runs the engine, every rank replays its runner's calls): teacher-forced logits, greedy
  decoding plain and with the shipped Medusa and Hydra++ heads and their trees (Hydra++ with a
  prompt-lookup chain), the batched engine with requests joining and leaving, and a seeded
  sampled request, each compared with the whole model in this process (TP 1);
- small random models at TP 2 and 4 (more heads than KV heads; at 4, fewer KV heads than ranks:
  replicated), loaded by slices from a checkpoint written here;
- sharded weights reassemble to the original, one test per kind of linear;
- bad settings fail with one clear line; a killed rank fails the group in bounded time."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import save_file

from medusa.decoding.engine import Engine, Request
from medusa.decoding.generate import generate, single_engine
from medusa.decoding.sampling import SamplingParams
from medusa.decoding.tree import load_tree, with_lookup
from medusa.heads.io import load_heads
from medusa.parallel.comm import NO_MULTICAST, Group, ParallelError, check_world
from medusa.parallel.launch import launch
from medusa.parallel.load import load_heads_sharded, load_sharded
from medusa.parallel.lockstep import Lockstep, StepPlan
from medusa.parallel.replica import replica, step_model
from medusa.parallel.shard import layout, shard_model
from medusa.runtime import shipped_heads_dir
from tests.conftest import tiny_config, tiny_model

N_PROMPTS = 2  # MT-Bench first turns
NEW = 32
SAMPLED = SamplingParams(temperature=0.8, rule="sample", seed=1234)
SAMPLED_NEW = 16
# the batched engine: (prompt index, max new tokens, speculation), submitted in waves while rows run
WAVES = [[(0, 24, "on"), (1, 10, "auto")], [(1, 20, "off"), (0, 8, "on")], [(0, 12, "auto")]]


# ------------------------------------------------------------------ what every run decodes (TP 1 and TP 3 alike)

def _heads_tree(label, folder):
    """The heads' searched tree for a CPU (shipped beside them); Hydra++'s with its lookup chain."""
    tree = load_tree(os.path.join(folder, "tree16.json"))
    return with_lookup(tree, 16) if label == "hydra" else tree


def _greedy(model, heads, tree, prompts, n=NEW):
    """Each prompt's first n tokens, one engine (max_batch 1) for all of them."""
    eng = single_engine(model, heads, tree, max_seq_len=max(map(len, prompts)) + n)
    return [[t for c in generate(model, p, engine=eng, max_new_tokens=n, stop_token_ids=()) for t in c.tokens]
            for p in prompts]


def _sampled(model, heads, tree, prompt):
    eng = single_engine(model, heads, tree, max_seq_len=len(prompt) + SAMPLED_NEW)
    return [t for c in generate(model, prompt, engine=eng, params=SAMPLED, max_new_tokens=SAMPLED_NEW,
                                stop_token_ids=()) for t in c.tokens]


def _batched(model, heads, tree, prompts):
    """Requests join in waves (two more every three steps) and leave as they finish; rank 0's
    scheduler and adaptive policy decide, the other ranks only replay."""
    eng = Engine(model, heads, tree, max_batch=4, max_seq_len=max(map(len, prompts)) + 32)
    handles = []
    for wave in WAVES:
        handles += [eng.submit(Request(prompts[i], max_new_tokens=n, stop_token_ids=(), speculation=s))
                    for i, n, s in wave]
        for _ in range(3):
            eng.step()
    out = [h.result()[0] for h in handles]
    return out, dict(eng.stats()["steps_by_tree"])


def _decode_all(model, heads_by_label, prompts, replicated=True):
    """Everything the TP 3 run decodes (replicated: over a sharded model, rank 0 driving the
    engines), or, for TP 1 (the whole model in this process), the plain greedy tokens and the
    seeded sampled ones that the TP 3 results are compared with. heads_by_label: label ->
    (heads, tree)."""
    res = {}
    for label, (heads, tree) in heads_by_label.items():
        m = step_model(model, heads)
        with replica(m.tp_group, m, heads) if replicated else _one() as driving:
            if not driving:
                continue
            r = res[label] = {}
            if label == "medusa":
                r["plain"] = _greedy(m, None, "ar", prompts)
            if replicated:
                r["spec"] = _greedy(m, heads, tree, prompts)
            if label == "hydra":
                r["sampled"] = _sampled(m, heads, tree, prompts[0])
                if replicated:
                    r["batched"], r["batched_trees"] = _batched(m, heads, tree, prompts)
    return res


class _one:
    """The whole model in this process: nothing to replicate."""

    def __enter__(self):
        return True

    def __exit__(self, *exc):
        return False


def _default_rank(group, hf_dir, heads_dirs, prompts, teacher):
    model, _ = load_sharded(hf_dir, group)
    out = {"local_kv_heads": model.cfg.num_kv_heads, "cache_heads": model.new_cache(1, 4).kv.shape[3]}
    with torch.inference_mode():  # every rank runs the teacher-forced forward (its collectives pair up)
        T = len(teacher)
        pos = torch.arange(T)[None]
        out["logits"] = model(torch.tensor([teacher]), pos, model.new_cache(1, T), pos,
                              torch.ones(T, T, dtype=torch.bool).tril()[None]).logits.numpy()
    heads = {label: (load_heads_sharded(folder, model), _heads_tree(label, folder)) for label, folder in heads_dirs.items()}
    out.update(_decode_all(model, heads, prompts))
    return out if group.rank == 0 else None


def _random_rank(group, hf_dir, prompts, teacher, n):
    model, _ = load_sharded(hf_dir, group)
    with torch.inference_mode():
        B, T = len(teacher), len(teacher[0])
        pos = torch.arange(T)[None].expand(B, T)
        logits = model(torch.tensor(teacher), pos, model.new_cache(B, T), pos,
                       torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)).logits.numpy()
    with replica(group, model) as driving:
        if not driving:
            return None
        return {"logits": logits, "plain": _greedy(model, None, "ar", prompts, n),
                "numel": sum(p.numel() for p in model.parameters()),  # what this rank loaded
                "env": {k: os.environ.get(k) for k in NO_MULTICAST}}


def _dying_rank(group, steps):
    def execute(plan):
        if group.rank == 1 and plan.args["i"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return group.all_reduce(torch.ones(4)).tolist()

    lock = Lockstep(group, execute)
    if group.rank != 0:
        lock.serve()
        return None
    try:
        return [lock.run(StepPlan("x", {"i": i})) for i in range(steps)]
    finally:
        lock.stop()


# ------------------------------------------------------------------ the default model at TP 3

@pytest.fixture(scope="module")
def heads_dirs():
    dirs = {name: shipped_heads_dir(name) for name in ("medusa", "hydra")}
    missing = [n for n, d in dirs.items() if d is None]
    if missing:
        pytest.skip(f"shipped heads missing: {missing}")
    return {n: str(d) for n, d in dirs.items()}


@pytest.fixture(scope="module")
def prompts(mt_prompts):
    return mt_prompts[:N_PROMPTS]


@pytest.fixture(scope="module")
def reference(stack, heads_dirs, prompts):
    """TP 1: the whole model through the same engine code in this process. Speculative greedy
    output equals plain greedy output there (test_golden.py), so plain greedy is the reference
    of every greedy run at TP 3, speculative and batched ones included."""
    heads = {label: (load_heads(folder, stack.model), _heads_tree(label, folder)) for label, folder in heads_dirs.items()}
    ref = _decode_all(stack.model, heads, prompts, replicated=False)
    teacher = prompts[0] + ref["medusa"]["plain"][0]
    with torch.inference_mode():
        T = len(teacher)
        pos = torch.arange(T)[None]
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None]
        ref["logits"] = stack.model(torch.tensor([teacher]), pos, stack.model.new_cache(1, T), pos, mask).logits
    ref["teacher"] = teacher
    return ref


@pytest.fixture(scope="module")
def tp3(stack, heads_dirs, prompts, reference):
    return launch(_default_rank, 3, str(stack.source.hf_dir), heads_dirs, prompts, reference["teacher"],
                  backend="gloo", timeout_s=900)[0]


def test_default_model_tp3_kv_cache_holds_its_heads(tp3):
    assert tp3["local_kv_heads"] == 1 and tp3["cache_heads"] == 1  # 3 KV heads over 3 ranks


def test_default_model_tp3_logits_match_tp1(tp3, reference):
    """Within 1e-4 in torch.testing's sense (|diff| <= 1e-4 + 1e-4 |logit|): the rank's partial
    sums add in another order than one GEMM's (measured: max |diff| 1.0e-4 at logits up to 28)."""
    torch.testing.assert_close(torch.from_numpy(tp3["logits"]), reference["logits"], rtol=1e-4, atol=1e-4)


def test_default_model_tp3_plain_engine_equals_tp1(tp3, reference):
    assert tp3["medusa"]["plain"] == reference["medusa"]["plain"]


@pytest.mark.parametrize("label", ["medusa", "hydra"])
def test_default_model_tp3_heads_greedy_equals_tp1(tp3, reference, label):
    """Through the Engine with the shipped heads and their tree (Hydra++: with a 16-node
    prompt-lookup chain drafted on rank 0), equal to TP 1's plain greedy tokens."""
    assert tp3[label]["spec"] == reference["medusa"]["plain"]


def test_default_model_tp3_batched_engine_equals_tp1(tp3, reference, prompts):
    """max_batch 4, requests joining in waves and leaving as they finish, speculation on / auto /
    off: every request's tokens are plain greedy decoding's (a prefix of it)."""
    plain = reference["medusa"]["plain"]
    want = [plain[i][:n] for wave in WAVES for i, n, _ in wave]
    assert tp3["hydra"]["batched"] == want
    assert sum(n for t, n in tp3["hydra"]["batched_trees"].items() if t != "ar") > 0  # some steps speculated


def test_default_model_tp3_seeded_sampling_equals_tp1(tp3, reference):
    assert len(tp3["hydra"]["sampled"]) == SAMPLED_NEW
    assert tp3["hydra"]["sampled"] == reference["hydra"]["sampled"]


# ------------------------------------------------------------------ random models at TP 2 and 4

def _write_checkpoint(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    state = {("model." + k if k != "lm_head.weight" else k): v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("rope_") and not (k == "lm_head.weight" and model.cfg.tie_word_embeddings)}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.cfg.to_hf()))


def _greedy_with_margins(model, prompt, n):
    """Greedy tokens of the whole model and each step's top-2 logit margin."""
    toks, margins = [], []
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            T = len(ids)
            pos = torch.arange(T)[None]
            logits = model(torch.tensor([ids]), pos, model.new_cache(1, T), pos,
                           torch.ones(T, T, dtype=torch.bool).tril()[None]).logits[0, -1]
            top = logits.topk(2).values
            margins.append((top[0] - top[1]).item())
            toks.append(int(logits.argmax()))
            ids.append(toks[-1])
    return toks, margins


@pytest.mark.parametrize("world,shape", [
    (2, dict(num_heads=8, num_kv_heads=2, attention_bias=True)),  # qwen2-like biases, 1 KV head per rank
    (4, dict(num_heads=8, num_kv_heads=2, tie_word_embeddings=True)),  # KV heads replicated on 2 ranks each
])
def test_random_model_matches_tp1(tmp_path, monkeypatch, world, shape):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # an inherited setting must not turn multicast on
    kw = dict(vocab=250, hidden_size=64, head_dim=8, intermediate_size=128, **shape)  # 250 rows: a padded last shard
    model = tiny_model(seed=world, **kw)
    if model.cfg.tie_word_embeddings:
        model.tie_weights()
    _write_checkpoint(model, tmp_path / "ckpt")
    gen = torch.Generator().manual_seed(world)
    prompts = [torch.randint(0, 250, (6,), generator=gen).tolist() for _ in range(2)]
    teacher = [torch.randint(0, 250, (20,), generator=gen).tolist() for _ in range(2)]
    n = 12
    got = launch(_random_rank, world, str(tmp_path / "ckpt"), prompts, teacher, n, backend="gloo", timeout_s=600)[0]
    with torch.inference_mode():
        T = len(teacher[0])
        pos = torch.arange(T)[None].expand(2, T)
        ref = model(torch.tensor(teacher), pos, model.new_cache(2, T), pos,
                    torch.ones(T, T, dtype=torch.bool).tril()[None].expand(2, T, T)).logits
    assert got["env"] == NO_MULTICAST
    torch.testing.assert_close(torch.from_numpy(got["logits"]), ref, rtol=1e-4, atol=1e-4)
    whole = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert got["numel"] < (whole - norms) / world * 1.3 + norms  # a rank reads its slices, not the model
    for p, out in zip(prompts, got["plain"]):
        want, margins = _greedy_with_margins(model, p, n)
        tie = next((i for i, m in enumerate(margins) if m < 1e-4), n)
        if tie < n:
            print(f"TP {world}: near-tie (top-2 margin {margins[tie]:.2e}) at new token {tie}; compared up to it")
        assert out[:tie] == want[:tie]


# ------------------------------------------------------------------ reassembly, per kind of linear

def _shards(world, **kw):
    cfg_kw = dict(vocab=10, num_heads=4, num_kv_heads=2, attention_bias=True, **kw)
    whole = tiny_model(seed=1, **cfg_kw)
    parts = []
    for r in range(world):
        m = tiny_model(seed=1, **cfg_kw)
        parts.append(shard_model(m, Group(r, world, torch.device("cpu"))))
    return whole, parts


def _unique_cat(ts, dim):
    out = []
    for t in ts:  # replicated KV heads: consecutive ranks hold the same rows
        if not out or not torch.equal(out[-1], t):
            out.append(t)
    return torch.cat(out, dim)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind,names,dim", [
    ("column q", ["self_attn.q_proj.weight", "self_attn.q_proj.bias"], 0),
    ("column kv", ["self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias"], 0),
    ("row o", ["self_attn.o_proj.weight"], 1),
    ("column gate/up", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], 0),
    ("row down", ["mlp.down_proj.weight"], 1),
])
def test_sharded_linears_reassemble(world, kind, names, dim):
    whole, parts = _shards(world)
    for layer in range(whole.cfg.num_layers):
        for name in names:
            full = whole.get_parameter(f"layers.{layer}.{name}")
            pieces = [p.get_parameter(f"layers.{layer}.{name}") for p in parts]
            assert all(x.shape[dim] == full.shape[dim] // (min(world, 2) if "kv" in kind else world) for x in pieces)
            assert torch.equal(_unique_cat(pieces, dim), full)
    assert parts[0].layers[0].self_attn.n_heads == 4 // world


@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_bias_is_added_once(world):
    """A row-parallel projection's bias stays whole on the first rank and is zero on the others,
    so the all-reduce of the partial outputs adds it exactly once."""
    whole, parts = _shards(world)
    for layer in range(whole.cfg.num_layers):
        full = whole.get_parameter(f"layers.{layer}.self_attn.o_proj.bias")
        pieces = [p.get_parameter(f"layers.{layer}.self_attn.o_proj.bias") for p in parts]
        assert torch.equal(pieces[0], full) and not any(x.any() for x in pieces[1:])


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_vocabulary_reassembles(tied):
    whole, parts = _shards(4, tie_word_embeddings=tied)  # 10 rows over 4 ranks: 3, 3, 3, 1 + 2 padding
    if tied:
        whole.tie_weights()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        pieces = [p.get_parameter(name) for p in parts]
        assert [x.shape[0] for x in pieces] == [3, 3, 3, 3]
        assert torch.equal(torch.cat(pieces)[:10], whole.get_parameter(name))
        assert not pieces[-1][1:].any()  # padding rows are zero
    assert (parts[0].lm_head.weight is parts[0].embed_tokens.weight) == tied


def test_world_one_is_the_whole_model():
    """TP 1 through the sharded modules computes what the model computes, bit for bit."""
    from medusa.parallel.comm import single
    from medusa.parallel.shard import distributed_argmax

    whole = tiny_model(seed=3, vocab=50)
    one = shard_model(tiny_model(seed=3, vocab=50), single())
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9)[None].expand(2, 9)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None].expand(2, 9, 9)
    with torch.inference_mode():
        a = whole(ids, pos, whole.new_cache(2, 9), pos, mask)
        b = one(ids, pos, one.new_cache(2, 9), pos, mask)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(distributed_argmax(one.lm_head.local_logits(b.hidden), one.lm_head), a.logits.argmax(-1))


@pytest.mark.parametrize("world", [2, 4])
def test_fused_projections_are_fused_again_over_the_slices(world):
    """A GPU model fuses q/k/v and gate/up (one GEMM each): sharding fuses the rank's slices."""
    for r in range(world):
        m = shard_model(tiny_model(seed=1, vocab=10).fuse_projections(), Group(r, world, torch.device("cpu")))
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            assert torch.equal(a.qkv_weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            assert a.qkv_weight.shape[0] == (a.n_heads + 2 * a.n_kv) * a.head_dim
            assert torch.equal(f.gate_up_weight, torch.cat([f.gate_proj.weight, f.up_proj.weight]))


# ------------------------------------------------------------------ bad settings and failures

def test_bad_sizes_fail_with_one_clear_line():
    cfg = tiny_config(num_heads=9, num_kv_heads=3, head_dim=8, hidden_size=72, intermediate_size=96)
    with pytest.raises(ParallelError, match="^tensor parallel size 2 does not divide the model's 9 attention heads$"):
        layout(cfg, 0, 2)
    with pytest.raises(ParallelError, match="neither divides the model's 3 KV heads"):
        layout(tiny_config(num_heads=6, num_kv_heads=3, head_dim=8, hidden_size=48), 0, 2)
    layout(cfg, 0, 3)  # 9 heads, 3 KV heads: fine at 3
    with pytest.raises(ParallelError, match="must be >= 1"):
        check_world(0, "cpu")


def test_more_ranks_than_gpus_fail_before_starting():
    n = torch.cuda.device_count()
    want = f"^tensor parallel size {n + 1} needs {n + 1} GPU{'s' * (n > 0)}; this machine has {n}$"
    with pytest.raises(ParallelError, match=want):
        launch(_dying_rank, n + 1, 3, backend="nccl")


def test_a_killed_rank_fails_the_group_fast():
    t0 = time.monotonic()
    with pytest.raises(ParallelError, match="rank"):
        launch(_dying_rank, 3, 50, backend="gloo", timeout_s=120, pg_timeout_s=60)
    assert time.monotonic() - t0 < 60  # the killed rank is noticed, not waited out
