"""Which attention path a forward takes (SDPA, the matmul path or the Triton kernel), from the
MEDUSA_ATTENTION setting and cost models fitted on a GPU: the hardware tuning that the model
code does not hold. The model asks `use_matmul_attention` / `use_triton_attention` per forward
shape; `check_attention_setting` is called when a model loads.

Knows shapes, dtypes and devices; nothing of the model's weights or of decoding."""
from __future__ import annotations

import os

import torch

from medusa.errors import ModelLoadError
from medusa.kernels import enabled as kernels_enabled
from medusa.kernels import sm_count as _sm_count
from medusa.kernels.attention import launch_plan, takes_head_dim

# Attention at the decode step's small shapes. The step passes a boolean mask, so SDPA runs the
# memory-efficient kernel, which gives each (row, kv head, 64 query rows) one block that walks the
# whole KV span alone: at batch 1 that is 3 blocks on a GPU of 132 SMs, about 18 us per layer at
# 256 KV slots and 55 us at 1024 (H200). Two batched GEMMs and a float32 softmax spread the work
# over the GPU at a cost that grows with the score matrix instead, plus the layout copies around
# them. medusa.kernels.attention does all of it in one launch per layer (no layout copies, scores
# on chip; a long span at few rows is split over the SMs, with a second small kernel to combine
# the parts). On an H200 it took 5-215 us where the better torch path took 12-750 (1.3x-4.1x), at
# each of the 48 shapes of scripts/gpu/attention_bench.py (batch 1-64, 1-64 new tokens, 256-4096 slots).
# "auto" (the default) picks the cheapest of the three by the cost models below, fitted to that
# benchmark on an H200 (microseconds per layer), and the kernel only in half precision: with
# float32 inputs it runs IEEE products without tensor cores, and a float32 decode ran at 0.21x of
# the GEMM path. "torch" is auto without the kernel; "sdpa", "matmul" and "triton" force one
# (environment: MEDUSA_ATTENTION; "triton" falls back to torch's choice where Triton cannot run).
# CPUs take SDPA.
ATTENTION = os.environ.get("MEDUSA_ATTENTION", "auto")
ATTENTION_CHOICES = ("auto", "torch", "sdpa", "matmul", "triton")
TRITON_MAX_TOKENS = 128  # the Triton path takes forwards of at most this many new tokens per row


def check_attention_setting() -> None:
    """Raise a user-facing error for an unknown attention setting (checked when a model loads)."""
    if ATTENTION not in ATTENTION_CHOICES:
        raise ModelLoadError(f"MEDUSA_ATTENTION must be one of {', '.join(ATTENTION_CHOICES)}, got {ATTENTION!r}")


def efficient_us(batch: int, kv_heads: int, rows: int, kv_len: int, sms: int) -> float:
    """Fitted time of SDPA's memory-efficient kernel: one block per 64 folded query rows of a
    (row, kv head), each walking the KV span."""
    blocks = batch * kv_heads * -(-rows // 64)
    return (5 + 0.055 * kv_len) * max(1.0, blocks / sms)


def matmul_us(batch: int, kv_heads: int, rows: int, kv_len: int) -> float:
    """Fitted time of `attend_matmul` with the layer's layout copies (terms: launches, the span,
    the batched matrices, the score matrix)."""
    return 14.5 + 0.0012 * kv_len + 2.25e-4 * batch * kv_len + 9.2e-6 * batch * kv_heads * rows * kv_len


def triton_us(batch: int, kv_heads: int, rows: int, kv_len: int, sms: int) -> float:
    """Fitted time of medusa.kernels.attention: programs of (row, kv head, 16-64 folded query
    rows, part of the KV span) in waves over the SMs, each walking its part (a per-slot cost
    that grows with the rows it holds), plus the parts' combination when the span is split."""
    plan = launch_plan(batch, kv_heads, rows, kv_len, sms)
    waves = -(-plan.programs(batch, kv_heads) // sms)
    return 3.24 + plan.part * waves * (0.0066 + 0.0042 * plan.block_m / 64) + (3.15 if plan.splits > 1 else 0.0)


def use_matmul_attention(batch: int, kv_heads: int, rows: int, kv_len: int, device: torch.device) -> bool:
    """Whether attention over [batch, kv_heads, rows] folded query rows and kv_len cache slots
    takes `attend_matmul` (else SDPA), where the Triton kernel does not run."""
    if ATTENTION in ("sdpa", "matmul"):
        return ATTENTION == "matmul"
    if device.type != "cuda":
        return False
    return matmul_us(batch, kv_heads, rows, kv_len) < efficient_us(batch, kv_heads, rows, kv_len, _sm_count(device))


def use_triton_attention(batch: int, kv_heads: int, rows: int, kv_len: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> bool:
    """Whether attention over [batch, kv_heads, rows] folded query rows (a row's new tokens times
    the query heads per kv head) and kv_len cache slots takes the Triton kernel."""
    if not (takes_head_dim(head_dim) and kernels_enabled(device)):
        return False
    if ATTENTION == "triton":
        return True
    if ATTENTION != "auto" or dtype not in (torch.bfloat16, torch.float16):
        return False
    sms = _sm_count(device)
    torch_us = min(matmul_us(batch, kv_heads, rows, kv_len), efficient_us(batch, kv_heads, rows, kv_len, sms))
    return triton_us(batch, kv_heads, rows, kv_len, sms) < torch_us
