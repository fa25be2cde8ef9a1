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
    from medusa.kernels import attention_choice

    model = tiny_model(seed=5, vocab=16)
    tokens = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(3, 32)
    start = torch.tensor([0, 4, 11])  # rows that already hold 0, 4 and 11 tokens
    pos = start[:, None] + torch.arange(9)
    mask = attention_mask(start, torch.ones(9, 9, dtype=torch.bool).tril(), 24)

    def run(kind):
        monkeypatch.setattr(attention_choice, "ATTENTION", kind)
        c = model.new_cache(3, 32)
        c.kv.copy_(cache.kv)
        with torch.inference_mode():
            return model(tokens, pos, c, pos, mask).logits, c

    ref, ref_cache = run("sdpa")
    out, out_cache = run("matmul")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cache.k, ref_cache.k)
    # on a CPU the automatic choice keeps SDPA
    monkeypatch.setattr(attention_choice, "ATTENTION", "auto")
    assert not attention_choice.use_matmul_attention(1, 3, 3, 256, torch.device("cpu"))


def test_unknown_attention_setting_is_a_load_error(monkeypatch):
    from medusa.errors import ModelLoadError
    from medusa.kernels import attention_choice

    monkeypatch.setattr(attention_choice, "ATTENTION", "flash")
    with pytest.raises(ModelLoadError, match="MEDUSA_ATTENTION"):
        attention_choice.check_attention_setting()


def test_layer_inputs_rotate_q_and_k_scale_q_and_pass_v_through():
    """One set of per-head RoPE tables rotates the whole q/k/v projection: q comes out rotated
    and scaled by Dh^-0.5 (the softmax scale), k rotated, v unchanged, bit for bit."""
    model = tiny_model(seed=7, vocab=16)
    attn = model.layers[0].self_attn
    H, Hkv, Dh = attn.n_heads, attn.n_kv, attn.head_dim
    B, N = 2, 5
    x = torch.randn(B, N, model.cfg.hidden_size)
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 10, 11, 12]])
    mask = torch.ones(B, N, 16, dtype=torch.bool)
    inp = attn.inputs(x.dtype, model.rope_cos, model.rope_sin, pos, pos, mask)
    q, kv = attn.project(x, inp.cos, inp.sin)
    cos, sin = model.rope_cos[pos][:, :, None], model.rope_sin[pos][:, :, None]
    raw_q = attn.q_proj(x).view(B, N, H, Dh)
    raw_k = attn.k_proj(x).view(B, N, Hkv, Dh)
    raw_v = attn.v_proj(x).view(B, N, Hkv, Dh)
    torch.testing.assert_close(q, apply_rope(raw_q, cos, sin) * Dh ** -0.5)
    torch.testing.assert_close(kv[:, :, :Hkv], apply_rope(raw_k, cos, sin))
    assert torch.equal(kv[:, :, Hkv:], raw_v)
    assert inp.rows.shape == (B, 1) and inp.kv_len == 16 and not inp.matmul  # a CPU keeps SDPA


def test_kv_write_into_a_view_of_rows():
    """The one-kernel K/V write lands at each row's slots through a view of some pool rows
    (the engine's step runs on such views) and touches nothing else; a path commit moves
    keys and values together."""
    from medusa.model.kv_cache import KVCache

    L, R, Hkv, S, Dh = 2, 4, 3, 10, 4
    pool = KVCache(torch.zeros(L, 2, R, Hkv, S, Dh))
    view = pool.rows(1, 3)  # rows 1 and 2
    slots = torch.tensor([[2, 3, 4], [7, 8, 9]])
    new = torch.randn(2, 3, 2 * Hkv, Dh)  # [B, N, keys' heads then values' heads, Dh]
    view.write(1, torch.arange(2)[:, None], slots, new)
    for b in range(2):
        for n in range(3):
            s = int(slots[b, n])
            assert torch.equal(pool.k[1, 1 + b, :, s], new[b, n, :Hkv])
            assert torch.equal(pool.v[1, 1 + b, :, s], new[b, n, Hkv:])
    assert pool.kv[0].abs().sum() == 0 and pool.kv[:, :, [0, 3]].abs().sum() == 0
    assert int((pool.kv != 0).sum()) == int((new != 0).sum())  # nothing written anywhere else
    # commit: row 0 of the view keeps slots 3, 4 as 0, 1 (every layer, K and V alike)
    before = pool.kv.clone()
    view.commit_path(torch.tensor([[3, 4], [7, 8]]), torch.tensor([[0, 1], [7, 8]]))
    assert torch.equal(pool.kv[:, :, 1, :, 0:2], before[:, :, 1, :, 3:5])
    assert torch.equal(pool.kv[:, :, 2], before[:, :, 2])


def test_auto_attention_picks_a_path_that_measured_near_the_fastest(monkeypatch):
    """At each of the 48 shapes of the H200 attention benchmark (scripts/gpu/attention_bench.py:
    batch 1-64, 1-64 new tokens, 256-4096 KV slots; the kernel with its split KV spans), the
    path auto's fitted cost models pick (the Triton kernel, the GEMMs with the layer's layout
    copies, or SDPA's efficient kernel) measured within 10% of the fastest of the three."""
    import json
    from pathlib import Path

    from medusa.kernels import attention_choice


    monkeypatch.setattr(attention_choice, "ATTENTION", "auto")
    monkeypatch.setattr(attention_choice, "kernels_enabled", lambda device: True)
    monkeypatch.setattr(attention_choice, "_sm_count", lambda device: 132)  # the H200 the models were fitted on
    cuda = torch.device("cuda")  # a device object only: no GPU is touched
    bench = Path(__file__).resolve().parents[2] / "benchmarks/results/attention-bench-split-h200.json"
    rows = json.loads(bench.read_text())["rows"]
    assert len(rows) == 48
    for r in rows:
        B, R, S, us = r["batch"], 3 * r["nodes"], r["kv"], r["us"]
        if attention_choice.use_triton_attention(B, 3, R, S, 64, torch.bfloat16, cuda):
            got = us["triton"]
        else:
            got = us["matmul+copies"] if attention_choice.use_matmul_attention(B, 3, R, S, cuda) else us["efficient"]
        assert got <= 1.1 * min(us["triton"], us["matmul+copies"], us["efficient"]), r


def test_auto_attention_keeps_the_kernel_to_shapes_and_dtypes_it_serves(monkeypatch):
    from medusa.kernels import attention_choice

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention_choice, "_sm_count", lambda device: 132)
    monkeypatch.setattr(attention_choice, "kernels_enabled", lambda device: device.type == "cuda")
    monkeypatch.setattr(attention_choice, "ATTENTION", "auto")
    use = attention_choice.use_triton_attention
    assert use(1, 3, 3, 512, 64, torch.bfloat16, cuda) and use(1, 3, 3, 512, 64, torch.float16, cuda)
    assert use(1, 3, 3, 8192, 64, torch.bfloat16, cuda)  # a long span is split over the SMs
    assert not use(1, 3, 3, 512, 64, torch.float32, cuda)  # IEEE products without tensor cores
    assert not use(1, 3, 3, 512, 80, torch.bfloat16, cuda)  # head dim the kernel does not take
    assert not use(1, 3, 3, 512, 64, torch.bfloat16, torch.device("cpu"))
    # the choice is the cost models': a kernel predicted slower is not taken
    monkeypatch.setattr(attention_choice, "triton_us", lambda *a: 1e9)
    assert not use(1, 3, 3, 512, 64, torch.bfloat16, cuda)
    monkeypatch.setattr(attention_choice, "ATTENTION", "triton")
    assert use(1, 3, 3, 8192, 64, torch.float32, cuda)
    assert not use(1, 3, 3, 512, 80, torch.bfloat16, cuda)
    monkeypatch.setattr(attention_choice, "ATTENTION", "torch")
    assert not use(1, 3, 3, 512, 64, torch.bfloat16, cuda)
    attention_choice.check_attention_setting()  # "torch" is a valid setting


def test_kv_splits_spread_few_programs_over_the_gpu():
    from medusa.kernels.attention import MIN_SPLIT, kv_splits

    assert kv_splits(3, 256, 132) == 1  # a short span is not worth a second kernel
    assert kv_splits(3, 1024, 132) == 4  # parts of at least MIN_SPLIT slots
    assert kv_splits(3, 4096, 132) == 16  # at most MAX_SPLITS
    assert kv_splits(48, 4096, 132) == 4  # until the programs fill the SMs
    assert kv_splits(576, 4096, 132) == 1  # enough programs already
    for programs in (1, 3, 9, 40, 200):
        for span in (64, 300, 1000, 5000):
            n = kv_splits(programs, span, 132)
            assert n & (n - 1) == 0 and (n == 1 or span >= n * MIN_SPLIT)


@torch.inference_mode()
def test_block_ops_run_the_pure_pieces_without_changing_the_model():
    """A forward takes its per-layer pieces from `ops` (llama.BlockOps): another implementation
    runs in their place and gives the same output, and building compiled pieces
    (graphs.CompiledBlocks) rebinds no method of the model."""
    from medusa.decoding.graphs import CompiledBlocks
    from medusa.model.llama import BlockOps

    class Counting(BlockOps):
        def __init__(self):
            self.calls = {"norm": 0, "project": 0, "mlp": 0}

        def norm(self, norm, x):
            self.calls["norm"] += 1
            return super().norm(norm, x)

        def project(self, attn, x, cos, sin):
            self.calls["project"] += 1
            return super().project(attn, x, cos, sin)

        def mlp(self, mlp, x):
            self.calls["mlp"] += 1
            return super().mlp(mlp, x)

    model = tiny_model()
    L = model.cfg.num_layers
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)[None].expand(2, 5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None].expand(2, 5, 5)
    ref = model(tokens, pos, model.new_cache(2, 5), pos, mask).logits
    ops = Counting()
    out = model(tokens, pos, model.new_cache(2, 5), pos, mask, ops=ops).logits
    assert torch.equal(out, ref)
    assert ops.calls == {"norm": 2 * L + 1, "project": L, "mlp": L}
    CompiledBlocks(model)
    assert not any("forward" in vars(m) or "project" in vars(m) for m in model.modules())
