"""LoRA on the backbone (Medusa-2), on a tiny random model: adapters at zero change nothing, the
adapters switch off to the original, merged weights compute what the unmerged adapters do (fused
projections too), adapters saved beside heads load back merged, once, and heads of another
backbone are refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from medusa.errors import HeadsMismatchError
from medusa.heads.adapters import ADAPTERS, MARK, save_adapters
from medusa.heads.base import HeadsConfig
from medusa.heads.io import build_heads, fingerprint, load_heads, save_heads
from medusa.training.features import model_hidden
from medusa.training.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, lora_tensors
from tests.conftest import tiny_model

V = 16


def logits(model, tokens):
    with torch.no_grad():
        return model.lm_head(model_hidden(model, tokens))


def tokens(seed=0, shape=(2, 12)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, std=0.2, seed=1):
    """Nonzero adapters (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def adapted_model(targets=None, seed=0):
    m = tiny_model(seed=seed, vocab=V)
    apply_lora(m, LoRAConfig(4, 8.0, tuple(targets) if targets else LoRAConfig().targets))
    randomize(m)
    return m


def test_lora_at_zero_leaves_the_logits_unchanged():
    m = tiny_model(vocab=V)
    x = tokens()
    before = logits(m, x)
    mods = apply_lora(m, LoRAConfig(rank=4, alpha=8.0))
    assert len(mods) == 2 * 7 and all(float(x.lora_B.detach().abs().sum()) == 0 for x in mods.values())
    assert torch.equal(logits(m, x), before)
    assert fingerprint(m) == fingerprint(tiny_model(vocab=V))  # the fingerprint reads the frozen originals
    randomize(m)
    assert not torch.allclose(logits(m, x), before, atol=1e-3)
    with adapters_disabled(m):
        assert torch.equal(logits(m, x), before)  # switched off: the original again
    assert not torch.allclose(logits(m, x), before, atol=1e-3)
    with pytest.raises(ValueError, match="carries LoRA already"):
        apply_lora(m, LoRAConfig(rank=4))


def test_only_the_adapters_train():
    m = adapted_model()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    x = tokens()
    model_hidden(m, x).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n in trainable)


@pytest.mark.parametrize("bad", [LoRAConfig(rank=0), LoRAConfig(alpha=-1.0), LoRAConfig(targets=("q_proj", "wq")),
                                 LoRAConfig(targets=()), LoRAConfig(targets=("q_proj", "q_proj"))])
def test_bad_lora_settings_are_refused(bad):
    with pytest.raises(ValueError):
        apply_lora(tiny_model(vocab=V), bad)


def medusa2_folder(tmp_path, model, name="m2"):
    """Heads (random Medusa) + the model's adapters, saved as `medusa train --joint` saves them."""
    torch.manual_seed(3)
    cfg = HeadsConfig("medusa", 2, 1, model.cfg.hidden_size, V, fingerprint(model))
    heads = build_heads(cfg, model)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)][0]
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)},
                     key=LoRAConfig().targets.index)
    entry = save_adapters(tmp_path / name, lora_tensors(model), lora.lora_A.shape[0], lora.scale * lora.lora_A.shape[0],
                          targets, fingerprint(model))
    heads.config = HeadsConfig(**{**cfg.to_dict(), "extra": {"adapters": entry}})
    return save_heads(heads, tmp_path / name)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "down_proj"]])
def test_merged_adapters_compute_what_the_unmerged_ones_do(tmp_path, fused, targets):
    adapted = adapted_model(targets)
    x = tokens(seed=4)
    want = logits(adapted, x)
    folder = medusa2_folder(tmp_path, adapted)
    cfg = json.loads((folder / "heads.json").read_text())
    assert cfg["extra"]["adapters"]["file"] == ADAPTERS and (folder / ADAPTERS).is_file()  # heads.json says: adapted
    assert cfg["extra"]["adapters"]["base_fingerprint"] == cfg["base_fingerprint"]
    plain = tiny_model(vocab=V)
    if fused:
        plain.fuse_projections()  # the merge edits the weights the fused GEMMs read
    original = logits(plain, x)
    load_heads(folder, plain)
    torch.testing.assert_close(logits(plain, x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(original, want, atol=1e-3)
    # loading the same heads again merges nothing more
    load_heads(folder, plain)
    torch.testing.assert_close(logits(plain, x), want, atol=1e-5, rtol=1e-5)


def test_adapters_load_into_lora_modules_kept_separate(tmp_path):
    adapted = adapted_model()
    folder = medusa2_folder(tmp_path, adapted)
    shared = tiny_model(vocab=V)
    apply_lora(shared, LoRAConfig(4, 8.0))  # a backbone keeping its adapters apart (training, sharing)
    load_heads(folder, shared)
    x = tokens(seed=5)
    assert torch.equal(logits(shared, x), logits(adapted, x))
    assert getattr(shared, MARK, None) is None  # nothing merged
    other = tiny_model(vocab=V)
    apply_lora(other, LoRAConfig(2, 8.0))
    with pytest.raises(HeadsMismatchError, match="rank"):
        load_heads(folder, other)


def test_heads_of_another_backbone_are_refused_after_a_merge(tmp_path):
    adapted = adapted_model()
    folder = medusa2_folder(tmp_path, adapted)
    plain = tiny_model(vocab=V)
    frozen_heads = save_heads(build_heads(HeadsConfig("medusa", 2, 1, 32, V, fingerprint(plain)), plain), tmp_path / "m1")
    load_heads(frozen_heads, plain)  # Medusa-1 heads on the original: fine
    load_heads(folder, plain)  # merges
    with pytest.raises(HeadsMismatchError, match="another base model"):
        load_heads(frozen_heads, plain)  # trained for the original, not the adapted backbone
    other = copy.deepcopy(adapted)
    randomize(other, seed=9)
    folder2 = medusa2_folder(tmp_path, other, "m2b")
    with pytest.raises(HeadsMismatchError):
        load_heads(folder2, plain)  # other adapters on an adapted model


def test_tampered_or_missing_adapters_are_refused(tmp_path):
    folder = medusa2_folder(tmp_path, adapted_model())
    state = {k: v for k, v in lora_tensors(adapted_model()).items()}
    state[next(iter(state))] = state[next(iter(state))] + 1.0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / ADAPTERS))
    with pytest.raises(HeadsMismatchError, match="digest"):
        load_heads(folder, tiny_model(vocab=V))
    (folder / ADAPTERS).unlink()
    with pytest.raises(HeadsMismatchError, match="cannot be read"):
        load_heads(folder, tiny_model(vocab=V))
