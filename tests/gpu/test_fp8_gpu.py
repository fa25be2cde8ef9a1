"""FP8 GEMMs on a GPU of compute capability 8.9+ (H100/H200): FP8Linear runs the Triton
weight-only kernel (medusa.kernels.fp8_linear) for decode rows and torch._scaled_mm (per-row
activation scales, per-channel weight scales) above; both agree with the dequantised matmul to
FP8's precision and capture in a CUDA graph; a model loaded with quantization="fp8" computes
logits close to its bfloat16 self, its q/k/v and gate/up fused."""
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
    got = fp8._scaled_mm(x, lin.weight, lin.weight_scale, lin.bias)
    ref = F.linear(x.float(), lin.dequantized(torch.float32), lin.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 768)
    # activations rounded to e4m3 too: a few percent of the output's scale
    assert (got.float() - ref).abs().max() < 0.06 * ref.abs().max()
    # and it is the FP8 path: not bit-equal to the bfloat16 dequantised matmul
    assert not torch.equal(got, F.linear(x, lin.dequantized(torch.bfloat16), lin.bias))


@pytest.mark.parametrize("rows", [16, 128])  # the kernel's path (where Triton is), _scaled_mm's
def test_fp8_linear_captures_in_a_cuda_graph(rows):
    dev = _needs_fp8()
    lin = _linear(dev)
    x = torch.randn(rows, 512, device=dev, dtype=torch.bfloat16)
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


def _tiny_llama(path, max_positions: int) -> None:
    """A random 2-layer Llama checkpoint written by transformers itself into `path`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))


def test_fp8_model_computes_like_its_bf16_self(tmp_path):
    dev = _needs_fp8()
    from medusa.model.loading import load_model

    _tiny_llama(tmp_path, max_positions=128)
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


def _needs_kernel():
    dev = _needs_fp8()
    from medusa import kernels

    if not kernels.enabled(dev):
        pytest.skip("Triton not installed (or MEDUSA_KERNELS=torch)")
    return dev


# llama3-8b projections (N, K): q/k/v fused, o (and q), k/v, gate/up fused, down
SHAPES_8B = [(6144, 4096), (4096, 4096), (1024, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("n,k", SHAPES_8B)
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64])
def test_weight_only_kernel_matches_the_dequantised_matmul_at_8b_shapes(n, k, rows):
    from medusa.kernels.fp8_linear import fp8_matmul

    dev = _needs_kernel()
    torch.manual_seed(0)
    q, s = fp8.quantize_weight(torch.randn(n, k, device=dev) * 0.02)
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ (q.float() * s[:, None]).t() + bias.float()
    got = fp8_matmul(x, q, s, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # unrounded activations, float32 accumulation: the bfloat16 output's rounding and the order of sums
    assert (got.float() - ref).abs().max() <= ref.abs().max() / 100
    assert torch.equal(got, fp8_matmul(x, q, s, bias))  # deterministic (split-K has no atomics)


def test_fp8_linear_takes_the_kernel_for_decode_rows(monkeypatch):
    """With the kernel opted in (MEDUSA_FP8_KERNEL=triton), FP8Linear on 1..MAX_ROWS rows runs
    it: closer to the dequantised matmul than the _scaled_mm path (which rounds the activations
    to e4m3 too)."""
    from medusa.kernels.fp8_linear import MAX_ROWS

    monkeypatch.setenv("MEDUSA_FP8_KERNEL", "triton")
    dev = _needs_kernel()
    lin = _linear(dev, 4096, 1024)
    for rows in (1, MAX_ROWS):
        x = torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.float(), lin.dequantized(torch.float32), lin.bias.float())
        got, mm = lin(x), fp8._scaled_mm(x, lin.weight, lin.weight_scale, lin.bias)
        assert (got.float() - ref).abs().max() < (mm.float() - ref).abs().max()


@pytest.mark.parametrize("n,k", [(1024, 4096), (4096, 14336)])  # split-K, with the reduce kernel
def test_weight_only_kernel_captures_in_a_cuda_graph(n, k):
    """Warm-up tunes the shape; the capture replays it with new inputs. A shape first met inside
    capture takes the default config (autotuning would time kernels during capture)."""
    from medusa.kernels import fp8_linear

    dev = _needs_kernel()
    torch.manual_seed(0)
    q, s = fp8.quantize_weight(torch.randn(n, k, device=dev) * 0.02)
    for rows, warm in ((8, True), (40, False)):
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if warm:
                fp8_linear.fp8_matmul(x, q, s)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fp8_linear.fp8_matmul(x, q, s)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        ref = x.float() @ (q.float() * s[:, None]).t()
        assert (out.float() - ref).abs().max() <= ref.abs().max() / 100, (rows, warm)


def test_fused_fp8_model_computes_like_its_unfused_self(tmp_path, monkeypatch):
    """An FP8 load on a GPU fuses q/k/v and gate/up (as bfloat16 does): 3 GEMMs fewer per layer,
    the same function (decode rows: the opted-in kernel; a long prompt: _scaled_mm)."""
    dev = _needs_fp8()
    from medusa.model.loading import load_model

    monkeypatch.setenv("MEDUSA_FP8_KERNEL", "triton")  # decode rows through the kernel, as they would opt in
    _tiny_llama(tmp_path, max_positions=256)
    q, _ = load_model(tmp_path, dtype=torch.bfloat16, device=dev, quantization="fp8")
    assert q.layers[0].self_attn.qkv_scale is not None and q.layers[0].mlp.gate_up_scale is not None
    for n in (4, 100):
        ids = torch.randint(0, 512, (1, n), device=dev)
        pos = torch.arange(n, device=dev)[None]
        mask = (torch.arange(128, device=dev)[None, :] <= torch.arange(n, device=dev)[:, None])[None]
        with torch.inference_mode():
            fused = q(ids, pos, q.new_cache(1, 128), pos, mask).logits.float()
            for layer in q.layers:
                layer.self_attn.qkv_weight = layer.mlp.gate_up_weight = None
            separate = q(ids, pos, q.new_cache(1, 128), pos, mask).logits.float()
            for layer in q.layers:
                layer.fuse()
        assert (fused - separate).abs().max() < 0.02 * separate.abs().max()
