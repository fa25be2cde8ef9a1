"""Head training on a tiny random base model: the label shift, loss going down, checkpoint
resume to the identical state, accuracy bookkeeping, tree search by hand, distillation I/O."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from medusa.decoding.tree import expected_accept_length
from medusa.errors import RequestError
from medusa.heads.base import HeadsConfig
from medusa.heads.hydra import prefix_extra
from medusa.heads.io import build_heads, fingerprint
from medusa.model.config import ModelConfig
from medusa.model.llama import Transformer
from medusa.training.accuracy import HeadAccuracy, head_accuracy, trees_for_budgets
from medusa.training.data import (Record, collate, mix_prompts, plan_batches, read_prompt_file, read_records, sampled_mode,
                                  split)
from medusa.training.distill import DistillJob, distill
from medusa.training.features import (base_hidden, head_features, head_targets, path_embeddings, shift_left, teacher_positions,
                                      teacher_rows)
from medusa.training.losses import head_loss, teacher_probs
from medusa.training.trainer import TrainConfig, Trainer, lr_at

V = 37


def tiny_base(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(0,))
    m = Transformer(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval().requires_grad_(False)


def new_heads(base, head_type: str, K: int = 3, layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    extra = prefix_extra(base, 32) if head_type == "hydra++" else {}
    return build_heads(HeadsConfig(head_type, K, layers, 32, V, fingerprint(base), extra=extra), base)


def pattern_records(n: int = 24, seed: int = 0) -> list[Record]:
    """Learnable responses: counting sequences modulo V with a per-record stride."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start, stride = int(torch.randint(1, V, (1,), generator=g)), 1 + i % 3
        seq = [(start + stride * k) % (V - 1) + 1 for k in range(20)]
        out.append(Record(f"r{i}", "greedy", seq[:4], seq[4:]))
    return out


# ------------------------------------------------------------------ the label shift


def test_head_targets_are_token_t_plus_2_plus_i():
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[False, False, False, True, True, True, True, True]])  # response from position 3
    for i in range(3):
        targets, valid = head_targets(tokens, mask, i)
        for t in range(8):
            if t + 2 + i < 8:
                assert int(targets[0, t]) == 10 + t + 2 + i
                assert bool(valid[0, t]) == (t + 2 + i >= 3)
            else:
                assert not bool(valid[0, t])
    # hand check for head 0: position 1 (token 11) guesses token 13, the first response token
    targets, valid = head_targets(tokens, mask, 0)
    assert targets[0].tolist()[:6] == [12, 13, 14, 15, 16, 17] and valid[0].tolist() == [False, True, True, True, True, True, False, False]


def test_hydra_inputs_are_the_path_embeddings():
    base = tiny_base()
    tokens = torch.tensor([[3, 5, 7, 9, 11, 13]])
    emb = base.embed_tokens(tokens)[0]  # [T, D]
    for i in range(3):
        pe = path_embeddings(base, tokens, i)  # [1, T, i+1, D]
        assert pe.shape == (1, 6, i + 1, 32)
        for t in range(6 - 2 - i):  # positions with a target
            for j in range(i + 1):
                torch.testing.assert_close(pe[0, t, j], emb[t + 1 + j])  # tokens t+1 .. t+1+i
    row = torch.arange(6)[None]
    assert teacher_rows(row, 1)[0].tolist() == [2, 3, 4, 5, -1, -1]  # head 1 at t: base at t+2


def test_medusa_features_are_the_blocks_on_the_hidden_state():
    base = tiny_base()
    heads = new_heads(base, "medusa")
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    hidden = base_hidden(base, tokens)
    feats = head_features(heads, base, tokens, hidden)
    torch.testing.assert_close(feats[0], hidden)  # zero-initialised residual blocks: z = h


def test_the_shared_teacher_table_gives_each_head_the_base_distribution_at_t_plus_1_plus_i():
    base = tiny_base()
    heads = new_heads(base, "hydra++")
    torch.manual_seed(1)
    for p_ in heads.parameters():
        torch.nn.init.normal_(p_, std=0.1)
    b = collate(pattern_records(3), 64)
    tokens, mask = b.tokens, b.target_mask
    hidden = base_hidden(base, tokens)
    table, row = teacher_probs(hidden, teacher_positions(mask), base.lm_head)
    assert table.shape == (int(teacher_positions(mask).sum()), V)
    feats = head_features(heads, base, tokens, hidden)
    for i, z in enumerate(feats):
        targets, valid = head_targets(tokens, mask, i)
        assert bool((teacher_rows(row, i)[valid] >= 0).all())  # every valid row has its teacher
        # reference: the base distribution at t+1+i, computed directly for this head
        q = torch.softmax(base.lm_head(shift_left(hidden, 1 + i, 0.0)[valid]), -1)
        logp = torch.log_softmax(base.lm_head(z[valid]), -1)
        want = -(q * logp).sum() / int(valid.sum())
        got = head_loss(z, targets, valid, base.lm_head, table, teacher_rows(row, i), 1.0).loss
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("teacher_weight", [0.0, 0.5, 1.0])
def test_kept_and_recomputed_logits_give_the_same_step(teacher_weight):
    base = tiny_base()
    records = pattern_records(8)
    runs = []
    for recompute in (True, False):
        cfg = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=2, max_tokens=200, teacher_weight=teacher_weight,
                          recompute_logits=recompute)
        t = Trainer(base, new_heads(base, "hydra++", seed=3), records, [], cfg)
        assert t.recompute is recompute
        t.fit()
        runs.append(t.heads.state_dict())
    for name, a in runs[0].items():
        torch.testing.assert_close(a, runs[1][name], msg=name)
    assert TrainConfig().recompute_logits is None
    assert Trainer(base, new_heads(base, "medusa"), records, [], TrainConfig()).recompute  # a CPU recomputes


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("head_type", ["medusa", "hydra", "hydra++"])
def test_a_few_steps_lower_the_loss(head_type):
    base = tiny_base()
    heads = new_heads(base, head_type)
    records = pattern_records()
    cfg = TrainConfig(lr=3e-2, warmup_steps=2, epochs=30, max_steps=30, max_tokens=200, teacher_weight=0.5 if head_type == "hydra++" else 0.0)
    trainer = Trainer(base, heads, records, records[:6], cfg)
    before = trainer.evaluate()["loss"]
    trainer.fit()
    after = trainer.state.history[-1]["loss"]
    assert after < 0.8 * before, (before, after)


def test_checkpoint_resumes_to_the_same_state(tmp_path):
    base = tiny_base()
    records = pattern_records(16)
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, epochs=3, max_steps=7, max_tokens=120, checkpoint_every=1, eval_batches=1)
    straight = Trainer(base, new_heads(base, "hydra++", seed=0), records, records[:2], cfg)
    straight.fit()

    class Crash(Exception):
        pass

    def crash_at_4(m):
        if m["step"] == 4:
            raise Crash  # dies before step 4 is checkpointed: the checkpoint holds step 3

    first = Trainer(base, new_heads(base, "hydra++", seed=0), records, records[:2], cfg, checkpoint_dir=tmp_path)
    with pytest.raises(Crash):
        first.fit(on_step=crash_at_4)
    resumed = Trainer(base, new_heads(base, "hydra++", seed=99), records, records[:2], cfg, checkpoint_dir=tmp_path)
    assert resumed.load_checkpoint() and resumed.state.step == 3
    resumed.fit()
    assert resumed.state.step == straight.state.step == 7
    for (name, a), (_, b) in zip(straight.heads.state_dict().items(), resumed.heads.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.opt.state_dict()["state"][0]["step"] == straight.opt.state_dict()["state"][0]["step"]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_batches_are_deterministic_and_cover_the_epoch():
    records = pattern_records(40)
    a, b = plan_batches(records, 100, 64, seed=1, epoch=2), plan_batches(records, 100, 64, seed=1, epoch=2)
    assert a == b and sorted(i for batch in a for i in batch) == list(range(40))
    assert all(len(batch) * 20 <= 100 for batch in a)
    batch = collate(records[:2], max_len=64)
    assert batch.tokens.shape == (2, 20) and batch.target_mask[0].tolist() == [False] * 4 + [True] * 16


# ------------------------------------------------------------------ accuracy and trees


def test_accuracy_rank_conversion_and_bounds():
    acc = HeadAccuracy([[0.5, 0.7, 0.8], [0.2, 0.3, 0.3]], 10)
    assert [pytest.approx(r) for r in ([0.5, 0.2, 0.1], [0.2, 0.1, 0.0])] == acc.rank
    base = tiny_base()
    measured = head_accuracy(new_heads(base, "hydra"), base, pattern_records(8), topk=5, max_tokens=200)
    assert measured.tokens > 0
    for row in measured.topk:
        assert all(0.0 <= a <= 1.0 for a in row) and row == sorted(row)


def test_accuracy_counts_the_joint_rank_paths_of_the_same_positions():
    from medusa.decoding.tree import path_counts

    base = tiny_base()
    heads = new_heads(base, "hydra", K=3)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    records, k = pattern_records(8), 20
    measured = head_accuracy(heads, base, records, topk=k, max_tokens=200)
    # reference: one record at a time, position by position
    rows = []
    for r in records:
        tokens = torch.tensor([r.prompt_ids + r.response_ids])
        T, first = tokens.shape[1], len(r.prompt_ids)  # response tokens are first .. T-1
        feats = head_features(heads, base, tokens, base_hidden(base, tokens))
        for t in range(max(first - 2, 0), T - 2):
            ranks = []
            for i, z in enumerate(feats):
                top = heads.draft_topk(i, z[0, t], base, k).tolist() if t + 2 + i < T else []
                target = int(tokens[0, t + 2 + i]) if t + 2 + i < T else -1
                ranks.append(top.index(target) if target in top else k)
            rows.append(ranks)
    assert len(rows) == measured.tokens
    expected = path_counts(torch.tensor(rows), k)
    assert measured.paths == expected and max(len(p) for p in expected) == 3  # every depth observed
    saved = measured.to_dict()["path_counts"]
    assert saved == {",".join(map(str, p)): c for p, c in expected.items() if c >= 2}


def test_tree_search_matches_a_hand_calculation():
    rank = [[0.6, 0.2], [0.5, 0.1]]
    # path probabilities: (0) .6, (0,0) .3, (1) .2, (1,0) .1, (0,1) .06, (1,1) .02
    t4, t6 = trees_for_budgets(rank, [4, 6])
    assert t4.paths == [(0,), (1,), (0, 0)] and t4.expected_accept_length == pytest.approx(1 + 0.6 + 0.3 + 0.2)
    assert set(t6.paths) == {(0,), (1,), (0, 0), (1, 0), (0, 1)}
    assert t6.expected_accept_length == pytest.approx(2.26)
    assert expected_accept_length(t6.paths, rank) == pytest.approx(2.26)


def test_tree_command_writes_trees_and_ships_one(tmp_path):
    from medusa.cli import main

    (tmp_path / "acc.json").write_text(json.dumps({"rank": [[0.6, 0.2], [0.5, 0.1]]}))
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    cfg = HeadsConfig("medusa", 2, 1, 32, V, "f" * 16)
    (heads_dir / "heads.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["tree", "--accuracies", str(tmp_path / "acc.json"), "--nodes", "4,6", "--out", str(tmp_path / "trees"),
                 "--heads", str(heads_dir), "--ship-nodes", "4"]) == 0
    t6 = json.loads((tmp_path / "trees" / "tree6.json").read_text())
    assert t6["nodes"] == 6 and t6["expected_accept_length"] == pytest.approx(2.26)
    shipped = HeadsConfig.from_dict(json.loads((heads_dir / "heads.json").read_text()))
    assert shipped.tree == [[0], [1], [0, 0]]
    assert shipped.extra["rank_accuracy"] == [[0.6, 0.2], [0.5, 0.1]]  # the engine's acceptance priors
    (tmp_path / "bad.json").write_text("{}")
    assert main(["tree", "--accuracies", str(tmp_path / "bad.json"), "--out", str(tmp_path / "t2")]) == 2


def test_tree_command_searches_on_observed_paths_when_it_has_them(tmp_path):
    from medusa.cli import main

    # the rank table says rank 1 of head 0 is rarely followed; the observed paths say it always is, at rank 0
    doc = {"rank": [[0.6, 0.3], [0.5, 0.1]], "tokens": 10,
           "path_counts": {"0": 6, "1": 3, "1,0": 3, "0,0": 1, "0,1": 1}}
    (tmp_path / "acc.json").write_text(json.dumps(doc))
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    (heads_dir / "heads.json").write_text(json.dumps(HeadsConfig("hydra", 2, 1, 32, V, "f" * 16).to_dict()))
    assert main(["tree", "--accuracies", str(tmp_path / "acc.json"), "--nodes", "4", "--out", str(tmp_path / "c"),
                 "--heads", str(heads_dir), "--ship-nodes", "4"]) == 0
    counted = json.loads((tmp_path / "c" / "tree4.json").read_text())
    assert counted["paths"] == [[0], [1], [1, 0]] and counted["counted_accept_length"] == pytest.approx(1 + 12 / 10)
    shipped = json.loads((heads_dir / "heads.json").read_text())
    assert shipped["tree"] == [[0], [1], [1, 0]] and shipped["extra"]["tree_counted_accept_length"] == pytest.approx(2.2)
    assert main(["tree", "--accuracies", str(tmp_path / "acc.json"), "--nodes", "4", "--out", str(tmp_path / "i"),
                 "--search", "independent"]) == 0
    assert json.loads((tmp_path / "i" / "tree4.json").read_text())["paths"] == [[0], [1], [0, 0]]
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "path_counts": {"0,x": 1}}))
    assert main(["tree", "--accuracies", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    (tmp_path / "none.json").write_text(json.dumps({"rank": doc["rank"]}))
    assert main(["tree", "--accuracies", str(tmp_path / "none.json"), "--out", str(tmp_path / "n"), "--search", "counts"]) == 2


# ------------------------------------------------------------------ data and distillation


def test_prompt_files_of_every_layout_mix_and_split(tmp_path):
    (tmp_path / "sharegpt.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "yo"}\n')
    (tmp_path / "code.json").write_text(json.dumps([{"instruction": "sort", "input": "[2, 1]", "output": "[1, 2]"}]))
    (tmp_path / "gsm8k.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    files = [read_prompt_file(tmp_path / n) for n in ("sharegpt.jsonl", "code.json", "gsm8k.jsonl")]
    assert files[1][0].text == "sort\n\n[2, 1]" and files[2][0].id == "gsm8k:0"
    mixed = mix_prompts(files, seed=0)
    assert len(mixed) == 4 and {p.id.split(":")[0] for p in mixed[:3]} == {"sharegpt", "code", "gsm8k"}
    (tmp_path / "mt_bench.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    with pytest.raises(RequestError):
        read_prompt_file(tmp_path / "mt_bench.jsonl")
    assert sampled_mode("x:1", 0.0) == "greedy" and sampled_mode("x:1", 1.0) == "sample"
    recs = [Record(f"r{i}", "greedy", [1], [2]) for i in range(200)]
    train, held = split(recs, 0.1)
    assert 5 <= len(held) <= 40 and len(train) + len(held) == 200 and split(recs, 0.1) == (train, held)


class FakeHandle:
    def __init__(self, req, reason="eos"):
        self.req, self.reason = req, reason

    def cancel(self):
        self.reason = "cancelled"

    def __aiter__(self):
        return self._events()

    async def _events(self):
        await asyncio.sleep(0)
        n = self.req.max_new_tokens
        yield type("Ev", (), {"tokens": [self.req.prompt_ids[0]] * (n - 1), "finish_reason": None})()
        yield type("Ev", (), {"tokens": [0], "finish_reason": self.reason})()


class FakeEngine:
    def __init__(self):
        self.requests = []

    def submit(self, req):
        self.requests.append(req)
        return FakeHandle(req)


def test_distill_writes_records_and_resumes(tmp_path):
    out = tmp_path / "d.jsonl"
    jobs = [DistillJob(f"p{i}:{'sample' if i % 2 else 'greedy'}", "sample" if i % 2 else "greedy", [i + 1, 5]) for i in range(6)]
    eng = FakeEngine()
    s = distill(eng, jobs[:4], out, max_new_tokens=3, window=2)
    assert s.written == 4 and s.tokens == 12 and all(r.speculation == "off" for r in eng.requests)
    assert [r.sampling.greedy for r in eng.requests] == [True, False, True, False]
    s = distill(FakeEngine(), jobs, out, max_new_tokens=3)
    assert s.written == 2 and s.skipped == 4
    recs = read_records(out)
    assert sorted(r.id for r in recs) == sorted(j.id for j in jobs)
    assert recs[0].prompt_ids == [1, 5] and recs[0].response_ids == [1, 1, 0]
    with open(out, "a") as f:
        f.write('{"id": "half-writ')  # an interrupted run's last line is ignored
    assert len(read_records(out)) == 6


def test_distill_through_the_real_engine_matches_plain_greedy(tmp_path):
    from medusa.decoding.engine import Engine
    from medusa.decoding.generate import generate

    base = tiny_base()
    jobs = [DistillJob(f"p{i}:greedy", "greedy", [i + 1, 2 * i + 3, 5]) for i in range(4)]
    engine = Engine(base, max_batch=2)
    engine.start()
    try:
        s = distill(engine, jobs, tmp_path / "d.jsonl", max_new_tokens=6, stop_token_ids=(), window=3)
    finally:
        engine.stop()
    assert s.written == 4 and s.failed == 0
    for r in read_records(tmp_path / "d.jsonl"):
        plain = [t for c in generate(base, r.prompt_ids, max_new_tokens=6, stop_token_ids=()) for t in c.tokens]
        assert r.response_ids == plain


class SlowHandle(FakeHandle):
    async def _events(self):
        yield type("Ev", (), {"tokens": [7] * 40, "finish_reason": None})()
        while self.reason != "cancelled":
            await asyncio.sleep(0.01)
        yield type("Ev", (), {"tokens": [], "finish_reason": "cancelled"})()


class SlowEngine(FakeEngine):
    def submit(self, req):
        self.requests.append(req)
        return SlowHandle(req)


def test_distill_time_limit_keeps_long_prefixes_and_stops_submitting(tmp_path):
    jobs = [DistillJob(f"p{i}:greedy", "greedy", [1]) for i in range(10)]
    eng = SlowEngine()
    s = distill(eng, jobs, tmp_path / "d.jsonl", window=3, time_limit=0.2)
    assert len(eng.requests) == 3 and s.written == 3 and s.failed == 7
    assert all(r.response_ids == [7] * 40 for r in read_records(tmp_path / "d.jsonl"))


# ------------------------------------------------------------------ `medusa train --init-heads`


def _train_cli(capsys, *args):
    from medusa.cli import main

    code = main(["train", *args])
    _, err = capsys.readouterr()
    return code, err


def test_train_continues_from_the_shipped_heads(tmp_path, capsys):
    from safetensors.torch import load_file

    from medusa.runtime import shipped_heads_dir

    shipped = shipped_heads_dir("hydra")
    if shipped is None:
        pytest.skip("no shipped Hydra++ heads")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(Record(f"r{i}", "greedy", [1, 2 + i, 3], [(7 * i + 11 * k) % 1000 + 5 for k in range(20)]).to_json() + "\n"
                            for i in range(8)))
    out = tmp_path / "heads"
    common = ["--data", str(data), "--out", str(out), "--max-steps", "1", "--batch-tokens", "256", "--max-len", "32",
              "--warmup", "1", "--heldout", "0", "--eval-batches", "1", "--dtype", "float32", "--device", "cpu"]
    code, err = _train_cli(capsys, *common, "--init-heads", "hydra", "--lr", "1e-3", "--draft-vocab", "40")
    assert code == 0, err
    assert "from the heads in hydra" in err and "proposals restricted to 40 tokens" in err
    old, new = load_file(str(shipped / "heads.safetensors")), load_file(str(out / "heads.safetensors"))
    old.pop("draft_vocab", None)
    responses = {t for line in data.read_text().splitlines() for t in json.loads(line)["response_ids"]}
    assert set(new.pop("draft_vocab").tolist()) <= responses  # chosen again from this run's data
    assert old.keys() == new.keys()
    moved = 0
    for k in old:  # one AdamW step of at most ~lr from the shipped weights, not a fresh start
        torch.testing.assert_close(new[k].float(), old[k].float(), atol=3e-3, rtol=3e-3, msg=k)
        moved += int(not torch.equal(new[k], old[k]))
    assert moved > 0
    cfg = json.loads((out / "heads.json").read_text())
    assert cfg["head_type"] == "hydra++" and cfg["num_layers"] == 2 and cfg["extra"]["prefix"]["intermediate_size"] == 512
    assert cfg["tree"] is None and "rank_accuracy" not in cfg["extra"]  # the old weights' tree and table are dropped
    assert cfg["extra"]["draft_vocab"] == 40
    # a shape option that contradicts the heads is a one-line user error, exit code 2
    code, err = _train_cli(capsys, *common, "--out", str(tmp_path / "other"), "--init-heads", "hydra", "--num-layers", "1")
    assert code == 2 and "cannot shrink" in err and "Traceback" not in err
    code, err = _train_cli(capsys, *common, "--out", str(tmp_path / "other"), "--init-heads", "hydra", "--head-type", "medusa")
    assert code == 2 and "--head-type medusa does not match" in err and "Traceback" not in err
    # larger shapes grow the shipped heads: the old weights kept, the new blocks and MLP width added
    grown = tmp_path / "grown"
    code, err = _train_cli(capsys, *common, "--out", str(grown), "--init-heads", "hydra", "--num-layers", "3",
                           "--prefix-intermediate", "768")
    assert code == 0, err
    cfg = json.loads((grown / "heads.json").read_text())
    assert cfg["num_layers"] == 3 and cfg["extra"]["prefix"]["intermediate_size"] == 768
    new = load_file(str(grown / "heads.safetensors"))
    assert new["heads.0.blocks.1.linear.weight"].shape == (576, 576) and new["prefix.mlp.down_proj.weight"].shape == (576, 768)
    torch.testing.assert_close(new["heads.0.blocks.0.linear.weight"].float(), old["heads.0.blocks.0.linear.weight"].float(),
                               atol=3e-3, rtol=3e-3)
    code, err = _train_cli(capsys, *common, "--out", str(tmp_path / "other"), "--init-heads", str(tmp_path / "missing"))
    assert code == 2 and "is not a heads folder" in err


def test_eval_heads_reports_rank_paths_and_the_trees_acceptance(tmp_path, capsys, stack):
    from medusa.cli import main
    from medusa.decoding.generate import generate

    ids = stack.tokenizer.encode_prompt("Name three colours.", chat=True)
    response = [t for c in generate(stack.model, ids, max_new_tokens=24) for t in c.tokens]
    data = tmp_path / "d.jsonl"
    data.write_text(Record("p:greedy", "greedy", ids, response).to_json() + "\n")
    out = tmp_path / "acc.json"
    assert main(["eval", "heads", "--heads", "hydra", "--data", str(data), "--all", "--json", str(out),
                 "--device", "cpu", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["tokens"] == len(response)  # a step may start before every response token
    assert doc["path_counts"] and all(int(k.split(",")[0]) < 10 for k in doc["path_counts"])
    line = next(x for x in printed.splitlines() if "tree accepts" in x)
    assert 1.0 <= float(line.split("accepts ")[1].split()[0]) <= 5.0
