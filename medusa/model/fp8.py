"""FP8 linear layers, applied to a built model from outside (at load time): weights stored as
float8 e4m3 with a float32 scale per output channel (a per-tensor scale is the same number for
every channel), so w = weight.float() * weight_scale[:, None].

On a GPU of compute capability 8.9 or more (Ada, Hopper), with bfloat16 activations: with
MEDUSA_FP8_KERNEL=triton (opt-in, not yet measured on a GPU), a decode step's few rows (up to
medusa.kernels.fp8_linear.MAX_ROWS, memory-bound) run the Triton weight-only kernel, which reads the FP8 weights once and converts them in registers (the
activations stay bfloat16); more rows (every size by default) run the FP8 tensor-core GEMM `torch._scaled_mm`: each
activation row is quantised on the fly with its own scale (absmax / 448, computed on the
device, so a CUDA graph captures it) and the product is rescaled per row and per output
channel, in bfloat16. Without Triton (or MEDUSA_KERNELS=torch) every size takes `_scaled_mm`.
`fuse` concatenates projections (q/k/v, gate/up) like the bfloat16 model's. Elsewhere (CPUs, older GPUs, float32 activations) the
weight is dequantised for each call and multiplied in the activations' dtype: the memory stays
at one byte per weight, the time is not FP8's.

Checkpoint layouts read (see medusa.model.loading): `<linear>.weight` float8_e4m3fn [out, in]
with `<linear>.weight_scale` float32 of shape [], [1] or [out] / [out, 1] (fbgemm_fp8,
compressed-tensors FP8 "tensor" / "channel" strategies, static "fp8"); a checkpoint's static
`input_scale` is ignored (activations are scaled per row, dynamically). Does not know where
the weights come from, nor anything of attention, heads or decoding."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from medusa import kernels
from medusa.kernels import fp8_linear

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=None)
def scaled_mm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` with row-wise scales runs on `device` (compute capability
    8.9+ and a torch that has it)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (float8 e4m3 [out, in], float32 scale [out]): one scale
    per output channel, absmax / 448 (a zero row gets scale 1)."""
    amax = w.detach().abs().amax(dim=1).float()  # [out]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def channel_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A checkpoint's weight_scale ([], [1], [out] or [out, 1]) as float32 [out]."""
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        return s.expand(out_features).clone()
    if s.numel() != out_features:
        raise ValueError(f"weight_scale has {s.numel()} values for {out_features} output channels")
    return s


class FP8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias with weight float8 e4m3 [out, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale, self.bias)


def weight_only_kernel() -> bool:
    """Whether decode-sized FP8 GEMMs take the Triton weight-only kernel: opt-in
    (MEDUSA_FP8_KERNEL=triton) until its speed is measured on a GPU against `_scaled_mm`
    (`scripts/gpu/fp8_bench.py` prints both); by default every size takes `_scaled_mm`, the
    measured path (benchmarks/BENCHMARKS.md)."""
    return os.environ.get("MEDUSA_FP8_KERNEL", "scaled_mm") == "triton"


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ (weight [out, in] float8 * scale [out])^T + bias, by the fastest path the
    device has: on compute capability 8.9+ with bfloat16 activations, up to
    fp8_linear.MAX_ROWS rows (decode steps) the Triton weight-only kernel (weights converted in
    registers, activations unrounded), more rows (prefill, big batches) `_scaled_mm`; elsewhere
    the dequantised weight. Also what the fused q/k/v and gate/up projections call."""
    out, k = weight.shape
    if x.dtype == torch.bfloat16 and scaled_mm_supported(x.device) and k % 16 == 0 and out % 16 == 0:
        if x.numel() <= fp8_linear.MAX_ROWS * k and weight_only_kernel() and kernels.enabled(x.device):
            return fp8_linear.fp8_matmul(x, weight, scale, bias)
        return _scaled_mm(x, weight, scale, bias)
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(torch.float32) * scale[:, None]).to(dtype)  # [out, in]


def _scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The FP8 tensor-core GEMM: each activation row quantised with its own scale (absmax /
    448, on the device), the product rescaled per row and per output channel."""
    out, k = weight.shape
    lead = x.shape[:-1]
    a = x.reshape(-1, k)  # [M, K]
    a_amax = a.abs().amax(dim=1, keepdim=True).float()  # [M, 1]
    # a zero row: any scale gives zeros; the floor keeps the division finite
    a_scale = a_amax.div_(FP8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    a8 = (a / a_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    # b must be column-major [K, N]: the transpose of the row-major [N, K] weight is
    y = torch._scaled_mm(a8, weight.t(), scale_a=a_scale, scale_b=scale[None, :],
                         out_dtype=torch.bfloat16)  # [M, N]
    if bias is not None:
        y = y + bias
    return y.view(*lead, out)


def fuse(lins: list[FP8Linear]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Concatenate FP8 linears along the output dim -> (weight [sum out, in] float8, scale
    [sum out] float32, bias or None) and make each linear's parameters views of them (one GEMM
    reads them all; the memory is not doubled). The scales are per channel already (a
    checkpoint's per-tensor scale was expanded on load), so the fused product is exact."""
    has_bias = [lin.bias is not None for lin in lins]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linears of which only some have a bias")
    # through uint8: concatenating float8 tensors is not implemented on every device
    weight = torch.cat([lin.weight.detach().view(torch.uint8) for lin in lins]).view(FP8)
    scale = torch.cat([lin.weight_scale.detach() for lin in lins])
    bias = torch.cat([lin.bias.detach() for lin in lins]) if all(has_bias) else None
    at = 0
    for lin in lins:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[at: at + n], requires_grad=False)
        lin.weight_scale = nn.Parameter(scale[at: at + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[at: at + n], requires_grad=False)
        at += n
    return weight, scale, bias


def to_fp8_linears(model: nn.Module) -> int:
    """Replace the decoder layers' projections (q/k/v/o, gate/up/down) of `model` with FP8Linear
    modules of the same shapes (on the same device, meta included); the embeddings, norms and
    LM head stay as they are. Call before loading weights. Returns how many were replaced."""
    n = 0
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                lin = getattr(parent, name, None)
                if not isinstance(lin, nn.Linear):
                    continue
                dev = lin.weight.device
                with torch.device(dev):
                    setattr(parent, name, FP8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                    lin.weight.dtype))
                n += 1
    return n


def has_fp8_linears(model: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in model.modules())
