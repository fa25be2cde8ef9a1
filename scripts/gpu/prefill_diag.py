import time, torch
from medusa.runtime import load_stack
from medusa.decoding.step import prefill
from medusa.decoding.sampling import BatchSampling, SamplingParams
s = load_stack(None, heads="none", dtype="bfloat16", device="cuda", progress=False)
m = s.model
cache = m.new_cache(4, 1024)
samp = BatchSampling.stack([SamplingParams()], "cuda")
def one(T, B=1):
    toks = torch.randint(0, 1000, (B, T), device="cuda")
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.inference_mode():
        prefill(m, None, type(cache)(cache.k[:, :B], cache.v[:, :B]), toks, torch.zeros(B, dtype=torch.long, device="cuda"),
                BatchSampling.stack([SamplingParams()] * B, "cuda"), None)
    torch.cuda.synchronize(); return (time.perf_counter() - t0) * 1e3
print("torch", torch.__version__, torch.backends.cuda.cudnn_sdp_enabled() if hasattr(torch.backends.cuda, "cudnn_sdp_enabled") else "?")
for T in (97, 98, 99, 97, 128, 128, 129, 130):
    print("T", T, f"{one(T):.1f} ms")
for B in (4, 4):
    print("B", B, "T 200", f"{one(200, B):.1f} ms")
torch.backends.cuda.enable_cudnn_sdp(False)
for T in (101, 102, 103, 104):
    print("no-cudnn T", T, f"{one(T):.1f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    one(150)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
