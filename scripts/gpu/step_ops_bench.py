"""Candidate implementations of the decode step's small operations, timed at the default
model's shapes on a GPU (hidden 576, 9 query heads and 3 kv heads of 64, MLP 1536, vocabulary
49,152, bfloat16), each inside a CUDA graph of 30 calls (one per layer, as in the step);
prints microseconds per call and checks that each candidate equals the current code.

  mlp    SwiGLU after the fused gate/up GEMM: "chunk" (the current code: silu and mul read
         strided halves), "transposed" (the GEMM writes [2F, M], so both halves are contiguous)
  rope   RoPE on q and k: "view" (the current code, on the strided q/k part of the fused
         projection), "all" (on the whole q/k/v output with identity tables for v: contiguous)
  kv     the KV write: "scatter" (current: one scatter per tensor), "index_put" (flat slot
         index built once per forward), "index_put_kv" (K and V as one tensor, one write)
  mask   the matmul attention's masking: "current" (logical_not + masked_fill_ + mul_),
         "inverted" (the inverted mask built once per forward), "bias" (an additive float bias
         built once per forward: add_ then mul_), "where" (torch.where into a new tensor)
  topk   the heads' top-k over the vocabulary: "topk" (torch.topk), "chunked" (top-k of each
         1,024-wide chunk, then of the survivors), "chunkmax" (top-k of the k chunks with the
         largest maxima)

  draft  a head's LM-head GEMM and top-k over a draft vocabulary of F rows (the F most frequent
         tokens; F = V is the whole vocabulary) and the map back to token ids: "us" with
         torch.topk, "kernel_us" with medusa.kernels.topk (Triton) one program per row, "split_<C>_us" with
         rows cut into C-wide pieces and merged, at the tree levels' row counts

  python3 scripts/gpu/step_ops_bench.py [--out FILE] [--only mlp,rope,kv,mask,topk,draft]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from medusa.kernels.topk import topk_ids

LAYERS = 30
D, H, HKV, DH, FF, V = 576, 9, 3, 64, 1536, 49152
DEV = "cuda"
BF = torch.bfloat16


def graph_us(fn, calls: int = LAYERS, replays: int = 50) -> float:
    """Median microseconds per call of `fn()` run `calls` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1000 / calls)
    return statistics.median(times)


def same(a, b, what):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            same(x, y, what)
        return
    if not torch.equal(a, b):
        err = (a.float() - b.float()).abs().max().item()
        print(f"  !! {what}: differs from the current code (max abs diff {err:.3g})")


def bench_mlp(rows):
    wgu = torch.randn(2 * FF, D, device=DEV, dtype=BF) * 0.04
    wd = torch.randn(D, FF, device=DEV, dtype=BF) * 0.03
    for M in (1, 16, 64, 256, 1024):
        x = torch.randn(1, M, D, device=DEV, dtype=BF)

        def chunk():
            g, u = F.linear(x, wgu).chunk(2, dim=-1)
            return F.linear(F.silu(g) * u, wd)

        def transposed():
            gu = torch.mm(wgu, x.view(M, D).t())  # [2F, M]
            h = F.silu(gu[:FF]).mul_(gu[FF:])  # [F, M]
            return F.linear(h.t(), wd).view(1, M, D)

        ref = chunk()
        out = transposed()
        if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
            print(f"  !! mlp transposed M={M}: max abs diff {(out.float() - ref.float()).abs().max().item():.3g}")
        r = {"op": "mlp", "M": M, "chunk": graph_us(chunk), "transposed": graph_us(transposed)}
        rows.append(r)
        print(json.dumps(r), flush=True)


def bench_rope(rows):
    from medusa.model.rope import apply_rope
    for B, N in ((1, 1), (1, 64), (16, 16), (64, 1), (64, 16)):
        qkv = torch.randn(B, N, H + 2 * HKV, DH, device=DEV, dtype=BF)
        cos = torch.randn(B, N, 1, DH, device=DEV, dtype=BF)
        sin = torch.randn(B, N, 1, DH, device=DEV, dtype=BF)
        # per-head tables with identity rows for v, built once per forward
        cos_all = torch.cat([cos.expand(B, N, H + HKV, DH), torch.ones(B, N, HKV, DH, device=DEV, dtype=BF)], 2)
        sin_all = torch.cat([sin.expand(B, N, H + HKV, DH), torch.zeros(B, N, HKV, DH, device=DEV, dtype=BF)], 2)

        def view():
            return apply_rope(qkv[:, :, : H + HKV], cos, sin)

        def all_heads():
            return apply_rope(qkv, cos_all, sin_all)

        out = all_heads()
        same(out[:, :, : H + HKV], view(), f"rope all B={B} N={N}")
        same(out[:, :, H + HKV:], qkv[:, :, H + HKV:], f"rope all (v) B={B} N={N}")
        r = {"op": "rope", "B": B, "N": N, "view": graph_us(view), "all": graph_us(all_heads)}
        rows.append(r)
        print(json.dumps(r), flush=True)


def bench_kv(rows):
    S = 1024
    for B, N in ((1, 1), (1, 64), (16, 16), (64, 1), (64, 16)):
        kv = torch.zeros(2, B, HKV, S, DH, device=DEV, dtype=BF)
        k_c, v_c = kv[0].clone(), kv[1].clone()
        src = torch.randn(B, N, H + 2 * HKV, DH, device=DEV, dtype=BF)
        k, v = src[:, :, H: H + HKV], src[:, :, H + HKV:]
        start = torch.randint(0, S - N, (B,), device=DEV)
        slots = start[:, None] + torch.arange(N, device=DEV)  # [B, N]
        idx = slots[:, None, :, None].expand(B, HKV, N, DH)
        b_ = torch.arange(B, device=DEV)[:, None, None]
        h_ = torch.arange(HKV, device=DEV)[None, None, :]
        flat = (b_ * HKV + h_) * S + slots[:, :, None]  # [B, N, Hkv] into a [B * Hkv * S, Dh] view
        t_ = torch.arange(2, device=DEV)[:, None, None, None]
        flat_kv = ((t_ * B + b_[None]) * HKV + h_[None]) * S + slots[None, :, :, None]  # [2, B, N, Hkv]
        flat_kv = flat_kv.permute(1, 2, 0, 3).reshape(B, N, 2 * HKV)  # matches src[:, :, H:]

        def scatter():
            k_c.scatter_(2, idx, k.transpose(1, 2))
            v_c.scatter_(2, idx, v.transpose(1, 2))

        def index_put():
            k_c.view(-1, DH).index_put_((flat,), k)
            v_c.view(-1, DH).index_put_((flat,), v)

        def index_put_kv():
            kv.view(-1, DH).index_put_((flat_kv,), src[:, :, H:])

        scatter()
        ref_k, ref_v = k_c.clone(), v_c.clone()
        k_c.zero_(), v_c.zero_()
        index_put()
        same((k_c, v_c), (ref_k, ref_v), f"kv index_put B={B} N={N}")
        index_put_kv()
        same((kv[0], kv[1]), (ref_k, ref_v), f"kv index_put_kv B={B} N={N}")
        r = {"op": "kv", "B": B, "N": N, "scatter": graph_us(scatter), "index_put": graph_us(index_put),
             "index_put_kv": graph_us(index_put_kv)}
        rows.append(r)
        print(json.dumps(r), flush=True)


def bench_mask(rows):
    from medusa.model.llama import _bmm_f32
    scale = DH ** -0.5
    for B, N, S in ((1, 1, 256), (1, 64, 256), (1, 64, 1024), (4, 64, 1024), (64, 1, 1024), (16, 16, 1024)):
        R = 3 * N
        q = torch.randn(B, HKV, R, DH, device=DEV, dtype=BF)
        k = torch.randn(B, HKV, S, DH, device=DEV, dtype=BF)
        mask = torch.rand(B, 1, R, S, device=DEV) < 0.7
        mask[..., 0] = True
        inv = mask.logical_not()
        bias = torch.zeros(B, 1, R, S, device=DEV).masked_fill_(inv, float("-inf"))

        def scores():
            return _bmm_f32(q.reshape(B * HKV, R, DH), k.reshape(B * HKV, S, DH).transpose(1, 2)).view(B, HKV, R, S)

        def current():
            return torch.softmax(scores().masked_fill_(mask.logical_not(), float("-inf")).mul_(scale), -1)

        def inverted():
            return torch.softmax(scores().masked_fill_(inv, float("-inf")).mul_(scale), -1)

        def biased():
            return torch.softmax(scores().add_(bias).mul_(scale), -1)

        def where():
            return torch.softmax(torch.where(mask, scores(), float("-inf")).mul_(scale), -1)

        ref = current()
        for fn, name in ((inverted, "inverted"), (biased, "bias"), (where, "where")):
            same(fn(), ref, f"mask {name} B={B} N={N} S={S}")
        r = {"op": "mask", "B": B, "N": N, "S": S, "scores+softmax": graph_us(lambda: torch.softmax(scores(), -1)),
             "current": graph_us(current), "inverted": graph_us(inverted), "bias": graph_us(biased), "where": graph_us(where)}
        rows.append(r)
        print(json.dumps(r), flush=True)


def chunked_topk(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    P, Vv = x.shape
    c = x.view(P, Vv // chunk, chunk).topk(k, dim=-1)  # [P, C, k]
    best = c.values.view(P, -1).topk(k, dim=-1).indices  # [P, k] into C * k
    base = (torch.arange(Vv // chunk, device=x.device) * chunk)[:, None]  # [C, 1]
    return (c.indices + base).view(P, -1).gather(1, best)


def chunkmax_topk(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Top-k via the chunks with the k largest maxima: every top-k element lies in one of them
    (a chunk without one has its maximum below the k-th value)."""
    P, Vv = x.shape
    C = Vv // chunk
    xc = x.view(P, C, chunk)
    best_chunks = xc.amax(-1).topk(k, dim=-1).indices  # [P, k]
    cand = xc[torch.arange(P, device=x.device)[:, None], best_chunks]  # [P, k, chunk]
    top = cand.view(P, -1).topk(k, dim=-1).indices  # [P, k] into k * chunk
    return best_chunks.gather(1, top // chunk) * chunk + top % chunk


def bench_topk(rows):
    for P, k in ((1, 10), (8, 10), (11, 7), (9, 5), (64, 10), (512, 10)):
        for dtype in (BF, torch.float32):
            x = torch.randn(P, V, device=DEV, dtype=dtype)

            def full():
                return x.topk(k, dim=-1).indices

            def chunked():
                return chunked_topk(x, k)

            def chunkmax():
                return chunkmax_topk(x, k)

            a = full()
            for fn, name in ((chunked, "chunked"), (chunkmax, "chunkmax")):
                b = fn()
                if not torch.equal(x.gather(1, a).sort(-1).values, x.gather(1, b).sort(-1).values):  # ties may pick other indices
                    print(f"  !! topk {name} P={P} k={k}: different values")
            r = {"op": "topk", "P": P, "k": k, "dtype": str(dtype).split(".")[-1], "topk": graph_us(full, calls=4),
                 "chunked": graph_us(chunked, calls=4), "chunkmax": graph_us(chunkmax, calls=4)}
            rows.append(r)
            print(json.dumps(r), flush=True)


def bench_draft(rows):
    w_full = torch.randn(V, D, device=DEV, dtype=BF) * 0.05
    for F_ in (V, 32768, 16384, 8192, 4096):
        ids = torch.randperm(V, device=DEV)[:F_].sort().values
        w = w_full[ids].contiguous()
        for P, k in ((1, 10), (4, 10), (8, 8), (11, 5)):
            z = torch.randn(P, D, device=DEV, dtype=BF)

            def draft():
                return ids[F.linear(z, w).topk(k, dim=-1).indices]

            def kernel(chunk):
                return lambda: topk_ids(F.linear(z, w), k, ids, kernel=True, chunk=chunk)

            logits = F.linear(z, w)
            a = draft()
            # kernel_us: one program per row; split_<C>_us: rows cut into C-wide pieces, then merged
            chunks = {"kernel_us": None, **{f"split_{c}_us": c for c in (512, 1024, 2048)}}
            for name, c in chunks.items():
                b = kernel(c)()
                if not torch.equal(logits.gather(1, torch.searchsorted(ids, a)), logits.gather(1, torch.searchsorted(ids, b))):
                    print(f"  !! draft kernel {name} F={F_} P={P} k={k}: other values than torch.topk")
            r = {"op": "draft", "F": F_, "P": P, "k": k, "us": graph_us(draft, calls=4),
                 **{name: graph_us(kernel(c), calls=4) for name, c in chunks.items()},
                 "gemm_us": graph_us(lambda: F.linear(z, w), calls=4)}
            rows.append(r)
            print(json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="mlp,rope,kv,mask,topk,draft")
    args = ap.parse_args()
    rows: list[dict] = []
    with torch.inference_mode():
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            globals()[f"bench_{name}"](rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
