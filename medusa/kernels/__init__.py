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


def triton_kernel(build):
    """Decorator: `build(triton, tl)` defines and returns a Triton kernel; the decorated function
    takes no arguments and returns build's result, built once on first use, or None where
    Triton is not installed."""
    @functools.lru_cache(maxsize=None)
    def kernel():
        mods = triton_language()
        return None if mods is None else build(*mods)

    return functools.wraps(build)(kernel)


def enabled(device: torch.device) -> bool:
    """Whether the kernels may run for tensors on `device`: CUDA, Triton installed, and not
    turned off (MEDUSA_KERNELS=torch)."""
    return device.type == "cuda" and os.environ.get("MEDUSA_KERNELS", "auto") != "torch" and triton_language() is not None


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (what a kernel's programs spread over)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
