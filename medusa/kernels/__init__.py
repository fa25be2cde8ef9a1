"""Optional GPU kernels (Triton) for the decode step's small operations. Each has a torch
fallback with the same contract, taken on CPUs, without Triton, or when MEDUSA_KERNELS=torch;
the core library (model, heads, decoding, training) calls only these wrappers, so it still
works with torch alone. Triton ships with torch's CUDA builds; it is never a requirement."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_language():
    """(triton, triton.language), or None where Triton is not installed (imported on first use,
    never at import time)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def enabled(device: torch.device) -> bool:
    """Whether the kernels may run for tensors on `device`: CUDA, Triton installed, and not
    turned off (MEDUSA_KERNELS=torch)."""
    return device.type == "cuda" and os.environ.get("MEDUSA_KERNELS", "auto") != "torch" and triton_language() is not None
