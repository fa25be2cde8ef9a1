"""Heads save/load round trip, and refusal of heads trained for another base model."""
import json

import pytest
import torch

from medusa.errors import HeadsMismatchError
from medusa.heads.io import fingerprint, load_heads, save_heads, untrained_heads
from tests.conftest import tiny_model


def test_round_trip(tmp_path):
    base = tiny_model(seed=1, vocab=16)
    heads = untrained_heads(base, num_heads=3, num_layers=2, name="tiny")
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    save_heads(heads, tmp_path)
    cfg = json.loads((tmp_path / "heads.json").read_text())
    assert cfg["head_type"] == "medusa" and cfg["base_fingerprint"] == fingerprint(base)
    back = load_heads(tmp_path, base)
    for (k, a), (k2, b) in zip(heads.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, base.cfg.hidden_size)
    assert torch.equal(heads(x, base), back(x, base))


def test_refuses_heads_of_another_base(tmp_path):
    save_heads(untrained_heads(tiny_model(seed=1, vocab=16)), tmp_path)
    other = tiny_model(seed=2, vocab=16)  # same shapes, other weights
    with pytest.raises(HeadsMismatchError, match="trained for another base model"):
        load_heads(tmp_path, other)
    with pytest.raises(HeadsMismatchError, match="trained for another base model"):
        load_heads(tmp_path, tiny_model(seed=1, vocab=32))


def test_fingerprint_is_stable_across_dtypes():
    base = tiny_model(seed=4)
    fp32 = fingerprint(base)
    assert fingerprint(base.to(torch.bfloat16)) == fp32


def test_not_a_heads_folder(tmp_path):
    with pytest.raises(HeadsMismatchError, match="not a heads folder"):
        load_heads(tmp_path, tiny_model())
