"""Each supported architecture against HF transformers: a tiny random checkpoint written by
transformers itself (save_pretrained, no download) loads through medusa.model.loading, and our
logits are within 1e-3 of HF's in float32 and greedy continuations are equal. Also: an
unsupported model_type is one clear line naming the supported ones."""
import json

import pytest
import torch

from medusa.errors import ModelLoadError
from medusa.model.config import SUPPORTED_ARCHS
from medusa.model.loading import load_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _configs():
    return {
        "llama3": transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "llama-bias": transformers.LlamaConfig(**COMMON, attention_bias=True),
        "mistral": transformers.MistralConfig(**COMMON, head_dim=32, sliding_window=None),
        "qwen2": transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True}),
        "qwen3": transformers.Qwen3Config(**COMMON, head_dim=32),
    }


def write_checkpoint(cfg, path, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases too, so that a missed one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return model


def causal_mask(start: int, n: int, kv_len: int) -> torch.Tensor:
    """[1, n, kv_len]: token i (at position start + i) sees slots 0 .. start + i."""
    return (torch.arange(kv_len)[None, :] <= (start + torch.arange(n))[:, None])[None]


def our_logits(model, ids: list[int], kv_len: int = 64) -> torch.Tensor:
    cache = model.new_cache(1, kv_len)
    pos = torch.arange(len(ids))[None]
    return model(torch.tensor([ids]), pos, cache, pos, causal_mask(0, len(ids), kv_len)).logits[0]


def our_greedy(model, ids: list[int], n: int, kv_len: int = 64) -> list[int]:
    cache = model.new_cache(1, kv_len)
    pos = torch.arange(len(ids))[None]
    logits = model(torch.tensor([ids]), pos, cache, pos, causal_mask(0, len(ids), kv_len)).logits[0, -1]
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        p = torch.tensor([[len(ids) + len(out) - 1]])
        logits = model(torch.tensor([[t]]), p, cache, p, causal_mask(p.item(), 1, kv_len)).logits[0, -1]
    return out


@pytest.mark.parametrize("name", ["llama3", "llama-bias", "mistral", "qwen2", "qwen3"])
def test_architecture_matches_hf(name, tmp_path):
    cfg = _configs()[name]
    hf = write_checkpoint(cfg, tmp_path)
    ours, src = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.cfg.arch == cfg.model_type
    ids = [int(t) for t in torch.randint(1, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
        got = our_logits(ours, ids)
        assert (got - ref).abs().max().item() < 1e-3
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(ids):].tolist()
        assert our_greedy(ours, ids, 16) == want


def test_llama3_scaling_is_read_and_changes_the_frequencies(tmp_path):
    """The llama3 checkpoint's RoPE really is scaled (so its parity above tests the scaling)."""
    from medusa.model.loading import read_config
    from medusa.model.rope import inv_frequencies

    write_checkpoint(_configs()["llama3"], tmp_path)
    cfg = read_config(tmp_path)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    plain = inv_frequencies(cfg.head_dim, cfg.rope_theta, None)
    scaled = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert not torch.allclose(plain, scaled)


def _checkpoint_of_type(folder, model_type: str) -> None:
    """A Llama checkpoint whose config.json names another model_type."""
    write_checkpoint(transformers.LlamaConfig(**COMMON), folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(raw))


def test_unsupported_model_type_is_one_line_naming_the_supported(tmp_path):
    _checkpoint_of_type(tmp_path, "gpt_neox")
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path, dtype=torch.float32, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "gpt_neox" in msg
    assert all(a in msg for a in SUPPORTED_ARCHS)


def test_unsupported_model_type_exits_2_in_the_cli(tmp_path):
    import subprocess
    import sys

    _checkpoint_of_type(tmp_path, "falcon")
    r = subprocess.run([sys.executable, "-m", "medusa.cli", "generate", "--model", str(tmp_path), "--heads", "none",
                        "--device", "cpu", "hello"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "falcon" in r.stderr and "qwen3" in r.stderr
