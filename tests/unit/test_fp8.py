"""FP8 weights (medusa/model/fp8.py) on CPU: FP8Linear against the dequantised reference, FP8
checkpoints in the compressed-tensors (per-tensor scale) and fbgemm (per-channel [out, 1] scale)
layouts load into FP8 projections and compute what the dequantised weights compute, a plain
checkpoint quantises on load with quantization="fp8", and formats we do not read are refused
in one line. The _scaled_mm path is tests/gpu/test_fp8_gpu.py."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medusa.errors import ModelLoadError
from medusa.model import fp8
from medusa.model.loading import load_model

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
LAYOUTS = {
    # compressed-tensors FP8 ("tensor" strategy): one scale per weight, shape [1]
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "tensor"}}},
        "ignore": ["lm_head"]}, "tensor"),
    # fbgemm_fp8: one scale per output channel, shape [out, 1]
    "fbgemm_fp8": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, "channel"),
}


def _causal(n: int, kv_len: int) -> torch.Tensor:
    return (torch.arange(kv_len)[None, :] <= torch.arange(n)[:, None])[None]


def logits(model, ids):
    cache = model.new_cache(1, 32)
    pos = torch.arange(len(ids))[None]
    with torch.inference_mode():
        return model(torch.tensor([ids]), pos, cache, pos, _causal(len(ids), 32)).logits[0]


def test_fp8_linear_equals_the_dequantised_matmul():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    # e4m3 keeps 3 mantissa bits: each weight within 2^-4 of itself (relative) after scaling back
    assert ((q.float() * scale[:, None] - w).abs() <= w.abs() / 16 + scale[:, None] / 512).all()
    lin = fp8.FP8Linear(32, 48, bias=True, bias_dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(q)
        lin.weight_scale.copy_(scale)
        lin.bias.normal_()
    x = torch.randn(3, 5, 32)
    ref = F.linear(x, q.float() * scale[:, None], lin.bias)
    assert torch.allclose(lin(x), ref, atol=1e-6)


def test_a_checkpoint_scale_of_any_layout_becomes_per_channel():
    assert fp8.channel_scale(torch.tensor(0.5), 4).tolist() == [0.5] * 4
    assert fp8.channel_scale(torch.tensor([0.5]), 4).tolist() == [0.5] * 4
    assert fp8.channel_scale(torch.arange(4.0)[:, None], 4).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        fp8.channel_scale(torch.ones(3), 4)


def write_fp8_checkpoint(tmp_path, layout: str):
    """A tiny random Llama written by transformers, its projections turned into FP8 + scales as
    the layout stores them; and a float32 twin holding the dequantised weights (the reference)."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CFG), dtype=torch.float32)
    plain, quant, ref = tmp_path / "plain", tmp_path / layout, tmp_path / f"{layout}-ref"
    hf.save_pretrained(str(plain))
    hf.save_pretrained(str(ref))
    qc, strategy = LAYOUTS[layout]
    state = load_file(str(plain / "model.safetensors"))
    out, deq = {}, {}
    for k, w in state.items():
        if any(f".{p}.weight" in k for p in fp8.LINEARS):
            if strategy == "tensor":
                scale = (w.abs().max() / fp8.FP8_MAX).reshape(1)
                q = (w / scale).to(fp8.FP8)
                deq[k] = q.float() * scale
            else:
                scale = (w.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX)  # [out, 1]
                q = (w / scale).to(fp8.FP8)
                deq[k] = q.float() * scale
            out[k], out[k + "_scale"] = q, scale.float()
            out[k.replace(".weight", ".input_scale")] = torch.ones(1)  # static activation scale: ignored
        else:
            out[k] = deq[k] = w
    quant.mkdir()
    save_file(out, str(quant / "model.safetensors"))
    raw = json.loads((plain / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps({**raw, "quantization_config": qc}))
    save_file(deq, str(ref / "model.safetensors"))
    return plain, quant, ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_checkpoint_computes_what_its_dequantised_weights_compute(tmp_path, layout):
    _, quant, ref = write_fp8_checkpoint(tmp_path, layout)
    model, _ = load_model(quant, dtype=torch.float32, device="cpu")
    assert model.cfg.quantization == "fp8"
    fp8_mods = [m for m in model.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(fp8_mods) == 7 * CFG["num_hidden_layers"]
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_mods)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    reference, _ = load_model(ref, dtype=torch.float32, device="cpu")
    ids = list(range(3, 15))
    assert (logits(model, ids) - logits(reference, ids)).abs().max().item() < 1e-4


def test_plain_checkpoint_quantised_on_load(tmp_path):
    plain, _, _ = write_fp8_checkpoint(tmp_path, "fbgemm_fp8")
    model, _ = load_model(plain, dtype=torch.float32, device="cpu", quantization="fp8")
    base, _ = load_model(plain, dtype=torch.float32, device="cpu")
    assert sum(isinstance(m, fp8.FP8Linear) for m in model.modules()) == 7 * CFG["num_hidden_layers"]
    ids = list(range(3, 15))
    a, b = logits(model, ids), logits(base, ids)
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()  # FP8 rounding, not another model
    assert a.argmax(-1).eq(b.argmax(-1)).float().mean() >= 0.75


def test_unsupported_quantization_is_one_line(tmp_path):
    plain, _, _ = write_fp8_checkpoint(tmp_path, "fbgemm_fp8")
    raw = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**raw, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(ModelLoadError) as e:
        load_model(plain, dtype=torch.float32, device="cpu")
    assert "awq" in str(e.value) and "fbgemm_fp8" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_model(plain, dtype=torch.float32, device="cpu", quantization="int3")


def test_fp8_checkpoint_without_quantization_config_names_the_cause(tmp_path):
    _, quant, _ = write_fp8_checkpoint(tmp_path, "fbgemm_fp8")
    raw = json.loads((quant / "config.json").read_text())
    del raw["quantization_config"]
    (quant / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="quantization_config"):
        load_model(quant, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_fp8_projections_compute_what_the_separate_ones_compute(tmp_path, layout):
    """fuse_projections on an FP8 model (what a GPU load does): q/k/v and gate/up become one
    float8 weight and one per-channel scale each (a per-tensor checkpoint scale included), the
    separate projections stay views of them, and the logits do not change."""
    _, quant, _ = write_fp8_checkpoint(tmp_path, layout)
    model, _ = load_model(quant, dtype=torch.float32, device="cpu")
    ids = list(range(3, 15))
    separate = logits(model, ids)
    model.fuse_projections()
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.qkv_weight.dtype == fp8.FP8 and attn.qkv_weight.shape == (64 + 2 * 32, 64)
    assert mlp.gate_up_weight.dtype == fp8.FP8 and mlp.gate_up_scale.shape == (2 * 96,)
    assert torch.equal(attn.qkv_scale, torch.cat([attn.q_proj.weight_scale, attn.k_proj.weight_scale,
                                                  attn.v_proj.weight_scale]))
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight_scale.untyped_storage().data_ptr() == mlp.gate_up_scale.untyped_storage().data_ptr()
    assert torch.allclose(logits(model, ids), separate, atol=1e-5, rtol=1e-5)


def test_fp8_and_plain_projections_do_not_fuse_together():
    from medusa.model.llama import _fuse_linears

    with pytest.raises(ValueError, match="FP8"):
        _fuse_linears(fp8.FP8Linear(16, 16, False, torch.float32), torch.nn.Linear(16, 16, bias=False))


def test_gpu_dispatch_takes_the_kernel_for_decode_rows_and_scaled_mm_above(monkeypatch):
    """On an FP8-capable GPU with Triton: up to MAX_ROWS rows the weight-only kernel, more rows
    _scaled_mm; without Triton every size _scaled_mm; float32 activations dequantise. The
    device checks are stood in for (CPU tensors), the GEMMs recorded."""
    from medusa.kernels import fp8_linear

    calls = []
    monkeypatch.setenv("MEDUSA_FP8_KERNEL", "triton")
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(fp8.kernels, "enabled", lambda device: True)
    monkeypatch.setattr(fp8_linear, "fp8_matmul", lambda x, w, s, b: calls.append("kernel") or x.new_zeros(*x.shape[:-1], w.shape[0]))
    monkeypatch.setattr(fp8, "_scaled_mm", lambda x, w, s, b: calls.append("scaled_mm") or x.new_zeros(*x.shape[:-1], w.shape[0]))
    lin = fp8.FP8Linear(32, 48, bias=False, bias_dtype=torch.bfloat16)
    cut = fp8_linear.MAX_ROWS
    for shape in ((1, 1, 32), (2, cut // 2, 32), (1, cut + 1, 32), (cut + 1, 32)):
        lin(torch.zeros(shape, dtype=torch.bfloat16))
    assert calls == ["kernel", "kernel", "scaled_mm", "scaled_mm"]
    monkeypatch.setattr(fp8.kernels, "enabled", lambda device: False)
    lin(torch.zeros(1, 32, dtype=torch.bfloat16))
    assert calls[-1] == "scaled_mm"
    monkeypatch.setattr(fp8.kernels, "enabled", lambda device: True)
    monkeypatch.delenv("MEDUSA_FP8_KERNEL")  # the default: _scaled_mm at every size
    lin(torch.zeros(1, 1, 32, dtype=torch.bfloat16))
    assert calls[-1] == "scaled_mm"
    calls.clear()
    assert lin(torch.zeros(1, 32)).shape == (1, 48) and calls == []  # float32: the dequantised weight


def test_kernel_split_and_row_block_rules():
    from medusa.kernels import fp8_linear

    assert [fp8_linear.row_block(m) for m in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    with pytest.raises(ValueError):
        fp8_linear.row_block(fp8_linear.MAX_ROWS + 1)
    sms = 132  # H100 SXM
    for m_block, n, k in ((16, 4096, 14336), (16, 1024, 4096), (64, 4096, 4096), (16, 28672, 4096)):
        s = fp8_linear.split_k(m_block, n, k, sms)
        assert 1 <= s <= fp8_linear.MAX_SPLIT and k // s >= fp8_linear.MIN_CHUNK
        assert m_block * 4 * s <= k // 4  # partial sums stay small beside the weights
        if n // fp8_linear.BLOCK_N >= 2 * sms:
            assert s == 1  # wide enough: no split
        elif s < fp8_linear.MAX_SPLIT and k // (2 * s) >= fp8_linear.MIN_CHUNK and m_block * 8 * s <= k // 4:
            assert n // fp8_linear.BLOCK_N * s >= 2 * sms  # split until the SMs are covered twice
    assert fp8_linear.split_k(16, 4096, 14336, sms) > 1  # down_proj splits


def test_the_kernel_is_never_autotuned_inside_cuda_graph_capture(monkeypatch):
    """A shape first met while capturing launches the default config; once an eager call has
    tuned it, capture launches the tuned kernel (its cached choice). The kernels are stood in
    for by recorders (no Triton needed); split-K adds the reduce launch."""
    from medusa.kernels import fp8_linear

    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((self.name, grid, meta.get("BLOCK_K")))

    monkeypatch.setattr(fp8_linear, "_kernels", lambda: (Recorder("tuned"), Recorder("plain"), Recorder("reduce")))
    monkeypatch.setattr(fp8_linear, "_tuned_keys", set())
    w, s = torch.zeros(96, 512, dtype=fp8.FP8), torch.ones(96)
    x = torch.zeros(3, 512, dtype=torch.bfloat16)

    def call(capturing, **kw):
        monkeypatch.setattr(fp8_linear, "_capturing", lambda t: capturing)
        launched.clear()
        fp8_linear.fp8_matmul(x, w, s, **kw)
        return [name for name, *_ in launched]

    assert call(True) == ["plain"] and launched[0][2] == fp8_linear.DEFAULT["BLOCK_K"]
    assert call(False) == ["tuned"]
    assert call(True) == ["tuned"]
    assert call(True, bias=torch.zeros(96, dtype=torch.bfloat16)) == ["plain"]  # another autotuner key
    assert call(False, split=2) == ["tuned", "reduce"] and launched[0][1] == (2, 2)
