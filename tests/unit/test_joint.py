"""Joint training (Medusa-2) on a tiny random base model: the KL loss against a direct
computation and zero for an unadapted model, one joint step lowering the combined loss, the
adapters' own learning rate and frozen start, checkpoint resume to the identical state, and the
golden property for a Medusa-2 model (speculative greedy == plain greedy of the adapted backbone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medusa.decoding.generate import Stats, generate
from medusa.decoding.tree import build_tree
from medusa.errors import HeadsMismatchError
from medusa.heads.adapters import save_adapters
from medusa.heads.io import fingerprint, load_heads, save_heads
from medusa.training.data import collate
from medusa.training.features import base_hidden, teacher_positions
from medusa.training.joint import JointConfig, JointTrainer
from medusa.training.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, lora_tensors
from medusa.training.losses import kl_loss, teacher_probs
from medusa.training.trainer import TrainConfig, Trainer
from tests.unit.test_training import V, new_heads, pattern_records, tiny_base

JOINT = JointConfig(LoRAConfig(rank=4, alpha=8.0), adapter_lr_scale=0.5, heads_weight=1.0)


def batch(records, n=6):
    b = collate(records[:n], max_len=64)
    return b.tokens, b.target_mask


def test_kl_loss_matches_a_direct_computation_and_is_zero_unadapted():
    base = tiny_base()
    tokens, mask = batch(pattern_records())
    needed = teacher_positions(mask)
    h0 = base_hidden(base, tokens)
    teacher, _ = teacher_probs(h0, needed, base.lm_head)
    same = kl_loss(h0, needed, teacher, base.lm_head)
    assert same.rows == int(needed.sum()) and abs(float(same.loss)) < 1e-6 and int(same.agree) == same.rows
    other = tiny_base(seed=1)
    h1 = base_hidden(other, tokens)
    got = kl_loss(h1, needed, teacher, base.lm_head)
    logp = F.log_softmax(base.lm_head(h0[needed]), -1)
    logq = F.log_softmax(base.lm_head(h1[needed]), -1)
    want = F.kl_div(logq, logp, log_target=True, reduction="batchmean")  # KL(p || q), mean over rows
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    assert int(got.agree) == int((logp.argmax(-1) == logq.argmax(-1)).sum())


def test_the_kl_of_an_unadapted_model_is_zero_in_training():
    base = tiny_base()
    trainer = JointTrainer(base, new_heads(base, "medusa"), pattern_records(), [], TrainConfig(max_steps=1, max_tokens=400), JOINT)
    _, _, extra = trainer._losses(*batch(pattern_records()))
    kl_sum, rows = extra["kl"]
    assert rows > 0 and abs(float(kl_sum)) < 1e-5  # the adapters start at zero: the original itself
    for m in base.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.2)
    _, _, extra = trainer._losses(*batch(pattern_records()))
    assert float(extra["kl"][0]) / extra["kl"][1] > 1e-3


@pytest.mark.parametrize("head_type,teacher_weight", [("medusa", 0.0), ("hydra++", 1.0)])
def test_one_joint_step_lowers_the_combined_loss(head_type, teacher_weight):
    base = tiny_base()
    records = pattern_records()
    cfg = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=3, max_tokens=400, teacher_weight=teacher_weight)
    trainer = JointTrainer(base, new_heads(base, head_type), records, [], cfg, JOINT)
    tokens, mask = batch(records)
    with torch.no_grad():
        before = float(trainer._losses(tokens, mask)[0])
    a0 = {k: v.clone() for k, v in lora_tensors(base).items()}
    m = trainer.train_step(tokens, mask)
    with torch.no_grad():
        after = float(trainer._losses(tokens, mask)[0])
    assert after < before, (before, after)
    moved = [k for k, v in lora_tensors(base).items() if not torch.equal(v, a0[k])]
    assert any(k.endswith("lora_B") for k in moved)  # the backbone's adapters train with the heads
    lrs = {bool(g.get("adapters")): g["lr"] for g in trainer.opt.param_groups}
    assert lrs[True] == pytest.approx(0.5 * lrs[False]) and m["lr"] == lrs[False]  # their own, smaller rate
    assert "kl" in m and "agree" in m


def test_a_frozen_start_trains_the_heads_alone_first():
    base = tiny_base()
    records = pattern_records()
    joint = JointConfig(LoRAConfig(rank=4, alpha=8.0), adapter_start=2)
    trainer = JointTrainer(base, new_heads(base, "medusa"), records, [], TrainConfig(lr=1e-2, warmup_steps=1, max_steps=3,
                                                                                     max_tokens=400), joint)
    tokens, mask = batch(records)
    trainer.train_step(tokens, mask)
    trainer.train_step(tokens, mask)
    assert all(float(v.abs().sum()) == 0 for k, v in lora_tensors(base).items() if k.endswith("lora_B"))
    trainer.train_step(tokens, mask)
    assert any(float(v.abs().sum()) > 0 for k, v in lora_tensors(base).items() if k.endswith("lora_B"))


def test_joint_checkpoint_resumes_to_the_same_state(tmp_path):
    records = pattern_records(16)
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, epochs=3, max_steps=4, max_tokens=160, checkpoint_every=1, eval_batches=1)

    def trainer(seed, ckpt=None):
        base = tiny_base()
        return JointTrainer(base, new_heads(base, "medusa", seed=seed), records, records[:2], cfg, JOINT, checkpoint_dir=ckpt)

    straight = trainer(0)
    straight.fit()
    assert "kl" in straight.state.history[-1] and "agree" in straight.state.history[-1]

    class Crash(Exception):
        pass

    def crash_at_3(m):
        if m["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        trainer(0, tmp_path).fit(on_step=crash_at_3)
    resumed = trainer(99, tmp_path)
    assert resumed.load_checkpoint() and resumed.state.step == 2
    resumed.fit()
    for name, a in straight.adapter_tensors().items():
        assert torch.equal(a, resumed.adapter_tensors()[name]), name
    for (name, a), (_, b) in zip(straight.heads.state_dict().items(), resumed.heads.state_dict().items()):
        assert torch.equal(a, b), name
    # a heads-only run refuses the joint checkpoint, and a joint run of another rank too
    base = tiny_base()
    with pytest.raises(HeadsMismatchError, match="joint training"):
        Trainer(base, new_heads(base, "medusa"), records, [], cfg, checkpoint_dir=tmp_path).load_checkpoint()
    base = tiny_base()
    other = JointConfig(LoRAConfig(rank=2, alpha=8.0))
    with pytest.raises(HeadsMismatchError, match="rank 4"):
        JointTrainer(base, new_heads(base, "medusa"), records, [], cfg, other, checkpoint_dir=tmp_path).load_checkpoint()


def greedy(model, ids, heads=None, tree=None, n=24):
    st = Stats()
    out = [t for c in generate(model, ids, heads=heads, tree=tree, max_new_tokens=n, stop_token_ids=(), stats=st) for t in c.tokens]
    return out, st


def test_golden_for_a_medusa2_model(tmp_path):
    """Trained jointly (a few steps), saved, loaded onto a fresh copy of the original: speculative
    greedy decoding equals the plain greedy decoding of the adapted backbone, token for token."""
    records = pattern_records(24)
    base = tiny_base()
    heads = new_heads(base, "medusa", K=3)
    cfg = TrainConfig(lr=3e-2, warmup_steps=1, max_steps=3, max_tokens=400)
    trainer = JointTrainer(base, heads, records, [], cfg, JointConfig(LoRAConfig(rank=4, alpha=8.0), adapter_lr_scale=1.0,
                                                                      kl_weight=0.1, heads_weight=1.0))
    trainer.fit()
    with torch.no_grad():  # make sure the adapted backbone differs from the original
        for m in base.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.add_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    entry = save_adapters(tmp_path, trainer.adapter_tensors(), 4, 8.0, JOINT.lora.targets, heads.config.base_fingerprint)
    heads.config = type(heads.config)(**{**heads.config.to_dict(), "extra": {"adapters": entry}})
    save_heads(heads.eval(), tmp_path)

    original, fresh = tiny_base(), tiny_base()
    loaded = load_heads(tmp_path, fresh)
    assert fingerprint(original) == heads.config.base_fingerprint
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]], name="t8")
    differs, accepted = 0, 0
    for r in records[:4]:
        ids = r.prompt_ids
        ar, _ = greedy(fresh, ids)
        spec, st = greedy(fresh, ids, loaded, tree)
        assert spec == ar
        differs += greedy(original, ids)[0] != ar
        accepted += sum(st.step_tokens) - st.steps
    assert differs > 0  # the adapters change what the backbone says: the golden test is about the adapted one
    assert accepted > 0  # some guesses were accepted, so the commit of accepted paths was exercised
