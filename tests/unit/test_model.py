"""The decoder's inference-time shortcuts equal the plain computation: fused q/k/v and gate/up
projections give the same outputs as the separate ones (sharing their memory), and RoPE with
the sign folded into the sine equals HF's rotate-half formula."""
import pytest
import torch

from medusa.decoding.step import attention_mask
from medusa.model.rope import apply_rope, rope_table

from tests.conftest import tiny_model


def _forward(model, tokens):
    B, T = tokens.shape
    cache = model.new_cache(B, T)
    pos = torch.arange(T)[None].expand(B, T)
    mask = attention_mask(torch.zeros(B, dtype=torch.long), torch.ones(T, T, dtype=torch.bool).tril(), T)
    with torch.inference_mode():
        out = model(tokens, pos, cache, pos, mask)
    return out.logits, cache


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_equal_separate_ones(bias):
    model = tiny_model(seed=3, vocab=16, attention_bias=bias)
    if bias:
        with torch.no_grad():
            for layer in model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    tokens = torch.randint(0, 16, (2, 11), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_cache = _forward(model, tokens)
    model.fuse_projections()
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
    assert (attn.qkv_bias is not None) == bias
    # the separate weights became views of the fused ones: same storage, nothing doubled
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    logits, cache = _forward(model, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-5, atol=1e-5)
    # the state dict still holds the separate projections by name (checkpoints and fingerprints)
    names = set(model.state_dict())
    assert "layers.0.self_attn.q_proj.weight" in names and "layers.0.self_attn.qkv_weight" not in names


def test_rope_with_folded_sign_equals_rotate_half():
    cos, sin_signed = rope_table(64, 16, 10000.0, None)
    half = 8
    sin = torch.cat([-sin_signed[:, :half], sin_signed[:, half:]], dim=-1)  # the plain sine
    assert torch.all(sin[:, :half] == sin[:, half:])
    x = torch.randn(2, 5, 3, 16)  # [B, N, heads, Dh]
    pos = torch.tensor([[0, 1, 2, 30, 63], [7, 7, 8, 9, 10]])
    c, s, ss = cos[pos][:, :, None], sin[pos][:, :, None], sin_signed[pos][:, :, None]
    rotate_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    torch.testing.assert_close(apply_rope(x, c, ss), x * c + rotate_half * s)


def test_matmul_attention_equals_sdpa(monkeypatch):
    """The GPU's small-shape attention path (two GEMMs, float32 softmax) gives SDPA's outputs,
    over a whole forward whose mask has rows with different visible spans (a second turn)."""
    from medusa.model import llama

    model = tiny_model(seed=5, vocab=16)
    tokens = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(3, 32)
    start = torch.tensor([0, 4, 11])  # rows that already hold 0, 4 and 11 tokens
    pos = start[:, None] + torch.arange(9)
    mask = attention_mask(start, torch.ones(9, 9, dtype=torch.bool).tril(), 24)

    def run(kind):
        monkeypatch.setattr(llama, "ATTENTION", kind)
        c = model.new_cache(3, 32)
        c.k.copy_(cache.k)
        c.v.copy_(cache.v)
        with torch.inference_mode():
            return model(tokens, pos, c, pos, mask).logits, c

    ref, ref_cache = run("sdpa")
    out, out_cache = run("matmul")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache.k, ref_cache.k)
    # on a CPU the automatic choice keeps SDPA
    monkeypatch.setattr(llama, "ATTENTION", "auto")
    assert not llama.use_matmul_attention(torch.zeros(1, 3, 3, 8), 256)


def test_unknown_attention_setting_is_a_load_error(monkeypatch):
    from medusa.errors import ModelLoadError
    from medusa.model import llama

    monkeypatch.setattr(llama, "ATTENTION", "flash")
    with pytest.raises(ModelLoadError, match="MEDUSA_ATTENTION"):
        llama.check_attention_setting()
