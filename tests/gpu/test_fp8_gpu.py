"""FP8 GEMMs on a GPU of compute capability 8.9+ (H100/H200): FP8Linear runs torch._scaled_mm
with per-row activation scales and per-channel weight scales, agrees with the dequantised
bfloat16 matmul to FP8's precision, captures in a CUDA graph, and a model loaded with
quantization="fp8" computes logits close to its bfloat16 self."""
import pytest
import torch
import torch.nn.functional as F

from medusa.model import fp8

pytestmark = pytest.mark.gpu


def _needs_fp8():
    dev = torch.device("cuda")
    if not fp8.scaled_mm_supported(dev):
        pytest.skip("torch._scaled_mm needs compute capability 8.9+")
    return dev


def _linear(dev, n_in=512, n_out=768, bias=True):
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, device=dev) * 0.02
    lin = fp8.FP8Linear(n_in, n_out, bias=bias, bias_dtype=torch.bfloat16).to(dev)
    q, s = fp8.quantize_weight(w)
    with torch.no_grad():
        lin.weight.copy_(q)
        lin.weight_scale.copy_(s)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_scaled_mm_path_matches_the_dequantised_matmul(rows):
    dev = _needs_fp8()
    lin = _linear(dev)
    x = torch.randn(2, rows, 512, device=dev, dtype=torch.bfloat16)
    got = lin(x)
    ref = F.linear(x.float(), lin.dequantized(torch.float32), lin.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 768)
    # activations rounded to e4m3 too: a few percent of the output's scale
    assert (got.float() - ref).abs().max() < 0.06 * ref.abs().max()
    # and it is the FP8 path: not bit-equal to the bfloat16 dequantised matmul
    assert not torch.equal(got, F.linear(x, lin.dequantized(torch.bfloat16), lin.bias))


def test_scaled_mm_path_captures_in_a_cuda_graph():
    dev = _needs_fp8()
    lin = _linear(dev)
    x = torch.randn(16, 512, device=dev, dtype=torch.bfloat16)
    eager = lin(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = lin(x)
    x.copy_(x * 2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out.float(), lin(x).float(), atol=1e-2)
    assert not torch.allclose(out.float(), eager.float())


def test_fp8_model_computes_like_its_bf16_self(tmp_path):
    dev = _needs_fp8()
    transformers = pytest.importorskip("transformers")
    from medusa.model.loading import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    base, _ = load_model(tmp_path, dtype=torch.bfloat16, device=dev)
    q, _ = load_model(tmp_path, dtype=torch.bfloat16, device=dev, quantization="fp8")
    assert sum(isinstance(m, fp8.FP8Linear) for m in q.modules()) == 14
    ids = torch.randint(0, 512, (1, 24), device=dev)
    pos = torch.arange(24, device=dev)[None]
    mask = (torch.arange(32, device=dev)[None, :] <= torch.arange(24, device=dev)[:, None])[None]
    with torch.inference_mode():
        a = q(ids, pos, q.new_cache(1, 32), pos, mask).logits.float()
        b = base(ids, pos, base.new_cache(1, 32), pos, mask).logits.float()
    assert (a - b).abs().max() < 0.1 * b.abs().max()  # FP8 rounding, not another model
    assert (a - b).abs().max() > 0  # and the FP8 GEMMs did run
