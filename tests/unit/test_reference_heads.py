"""Heads in the reference Medusa layout (medusa_lm_head.safetensors + config.json, as
FasterDecoding/Medusa, TGI and TensorRT-LLM read them): a folder written from random weights
loads back as our Medusa heads computing the same logits, through `--heads PATH` (load_heads);
sizes are checked instead of the fingerprint; malformed folders are one clear line."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medusa.errors import HeadsMismatchError
from medusa.heads.base import HeadsConfig
from medusa.heads.io import build_heads, load_heads
from medusa.heads.reference import SOURCE, save_reference
from tests.conftest import tiny_model


def random_heads(base, own_lm_head=True, K=3, L=1, seed=0):
    cfg = HeadsConfig("medusa", K, L, base.cfg.hidden_size, base.cfg.vocab_size, "", own_lm_head=own_lm_head)
    heads = build_heads(cfg, base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return heads.eval()


@pytest.mark.parametrize("L", [1, 2])
def test_round_trip_through_the_reference_layout(tmp_path, L):
    base = tiny_model(seed=1, vocab=32)
    heads = random_heads(base, L=L)
    save_reference(heads, tmp_path / "ref", base_name="tiny")
    keys = set(load_file(str(tmp_path / "ref" / "medusa_lm_head.safetensors")))
    assert f"0.{L}.weight" in keys and "0.0.linear.weight" in keys and "2.0.linear.bias" in keys
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 3 and cfg["medusa_num_layers"] == L
    loaded = load_heads(tmp_path / "ref", base)
    assert loaded.config.own_lm_head and loaded.config.extra["source"] == SOURCE
    assert loaded.config.base_fingerprint == ""  # none to check against
    h = torch.randn(2, 5, base.cfg.hidden_size)
    with torch.inference_mode():
        assert torch.allclose(loaded.head_logits(h, base), heads.head_logits(h, base), atol=1e-6)


def test_reference_keys_as_the_reference_writes_them(tmp_path):
    """Hand-written keys of the reference ModuleList (no writer of ours involved)."""
    base = tiny_model(seed=1, vocab=32)
    D, V = base.cfg.hidden_size, base.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    w = {"0.0.linear.weight": torch.randn(D, D, generator=g), "0.0.linear.bias": torch.randn(D, generator=g),
         "0.1.weight": torch.randn(V, D, generator=g)}
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1,
                                                      "base_model_name_or_path": "x"}))
    save_file(w, str(tmp_path / "medusa_lm_head.safetensors"))
    heads = load_heads(tmp_path, base)
    h = torch.randn(4, D)
    with torch.inference_mode():
        z = h + torch.nn.functional.silu(h @ w["0.0.linear.weight"].T + w["0.0.linear.bias"])
        assert torch.allclose(heads.head_logits(h, base)[:, 0], z @ w["0.1.weight"].T, atol=1e-5)


def test_blocks_only_folder_shares_the_base_lm_head(tmp_path):
    base = tiny_model(seed=1, vocab=32)
    heads = random_heads(base, own_lm_head=False, K=2)
    save_reference(heads, tmp_path, base_lm_head=base.lm_head.weight)
    state = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    save_file({k: v for k, v in state.items() if ".linear." in k}, str(tmp_path / "medusa_lm_head.safetensors"))
    loaded = load_heads(tmp_path, base)
    assert not loaded.config.own_lm_head
    h = torch.randn(3, base.cfg.hidden_size)
    with torch.inference_mode():
        assert torch.allclose(loaded.head_logits(h, base), heads.head_logits(h, base), atol=1e-6)


def test_sizes_are_checked_instead_of_a_fingerprint(tmp_path):
    save_reference(random_heads(tiny_model(seed=1, vocab=32)), tmp_path)
    with pytest.raises(HeadsMismatchError, match="vocabulary 32") as e:
        load_heads(tmp_path, tiny_model(seed=1, vocab=48))
    assert "\n" not in str(e.value)


def test_malformed_folders_are_one_line(tmp_path):
    base = tiny_model(seed=1, vocab=32)
    save_reference(random_heads(base), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(HeadsMismatchError, match="does not fit medusa_num_heads=2"):
        load_heads(tmp_path, base)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 4, "medusa_num_layers": 1}))
    with pytest.raises(HeadsMismatchError, match="lacks"):
        load_heads(tmp_path, base)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(HeadsMismatchError, match="not a readable reference Medusa folder"):
        load_heads(tmp_path, base)


def test_reference_heads_serve_the_default_model_through_the_cli(tmp_path, stack, capsys):
    """The shipped Medusa heads exported to the reference layout, given as --heads DIR: the
    greedy output is plain greedy's, and the heads still guess (more than a token per step)."""
    from medusa.cli import main
    from medusa.runtime import shipped_heads_dir

    shipped = shipped_heads_dir("medusa")
    if shipped is None:
        pytest.skip("no shipped medusa heads in this installation")
    heads = load_heads(shipped, stack.model)
    save_reference(heads, tmp_path / "ref", base_lm_head=stack.model.lm_head.weight)
    common = ["generate", "Name three primes.", "--max-new-tokens", "16", "--json", "--device", "cpu",
              "--dtype", "float32"]
    assert main([*common, "--heads", str(tmp_path / "ref"), "--tree", "tree4"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*common, "--mode", "ar", "--heads", "none"]) == 0
    ar = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec["token_ids"] == ar["token_ids"]
    assert spec["mean_accepted"] > 1.0
