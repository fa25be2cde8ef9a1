"""Eager prefill time per prompt length on a GPU, with and without cuDNN attention (which builds
an execution plan for every new shape), and a kernel profile of one prefill. Run on a lent GPU
machine after `source scripts/gpu/env.sh`. Found: 80-550 ms for a first length with cuDNN, 24 ms
without (H100, 2026-11-24); the model now keeps to the other attention kernels (model/llama.py)."""
import time

import torch

from medusa.decoding.sampling import BatchSampling, SamplingParams
from medusa.decoding.step import prefill
from medusa.runtime import load_stack

model = load_stack(None, heads="none", dtype="bfloat16", device="cuda", progress=False).model
cache = model.new_cache(4, 1024)


def one(T: int, B: int = 1) -> float:
    """ms for one prefill of B rows x T random tokens."""
    toks = torch.randint(0, 1000, (B, T), device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        prefill(model, None, cache.rows(0, B), toks, torch.zeros(B, dtype=torch.long, device="cuda"),
                BatchSampling.stack([SamplingParams()] * B, "cuda"), None)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


for T in (97, 98, 99, 97, 128, 128, 129, 130):
    print("T", T, f"{one(T):.1f} ms")
for B in (4, 4):
    print("B", B, "T 200", f"{one(200, B):.1f} ms")
torch.backends.cuda.enable_cudnn_sdp(False)
for T in (101, 102, 103, 104):
    print("no cuDNN, T", T, f"{one(T):.1f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    one(150)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
