"""Attention kernels at the decode step's shapes, on a GPU (default model: 3 kv heads, 3 query
heads per kv head, head dim 64, bfloat16).

The step folds each kv head's query heads into its query rows ([B, Hkv, rep * N, Dh]) and
passes a boolean mask, so SDPA cannot use flash attention and picks the memory-efficient
kernel, which launches one block per 64 query rows of each (row, kv head): at batch 1 that is
3 blocks on a GPU of 132 SMs. This times the candidates inside CUDA graphs (30 calls per
replay, one per layer, as in the step) and prints microseconds per call:

  efficient  SDPA, memory-efficient kernel (what SDPA picks for a boolean mask)
  math       SDPA, math backend
  cudnn      SDPA, cuDNN backend (where it takes the shape)
  matmul     the model's small-shape path (medusa.model.llama.attend_matmul): two batched
             GEMMs and a float32 softmax; MEDUSA_ATTENTION=auto picks it where it is faster

and, from the queries as the fused projection leaves them ([B, N, H, Dh], a strided view) to the
output in the layout o_proj reads ([B, N, H * Dh]), i.e. with the layout copies a layer pays:

  matmul+copies  the folding copy, attend_matmul, the copy back (what a layer runs today)
  triton         medusa.kernels.attention.tree_attention (MEDUSA_ATTENTION=triton): one kernel, or
                 two where the KV span is split (kv_splits)
  triton-1part   the same kernel with the span never split

and the choice MEDUSA_ATTENTION=auto makes at each shape from its fitted cost models.

  python3 scripts/gpu/attention_bench.py [--kv 256,1024] [--batches 1,4,16,64] [--nodes 1,16,64] [--out FILE]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from medusa.kernels import sm_count
from medusa.kernels.attention import launch_plan, tree_attention
from medusa.kernels import attention_choice
from medusa.model.llama import attend_matmul
from step_ops_bench import graph_us  # this folder: scripts/gpu

LAYERS = 30


def sdpa_with(backend):
    def fn(q, k, v, mask):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return fn


def time_graph(fn, q, k, v, mask) -> float | None:
    """Microseconds per call in a graph of LAYERS calls, or None where the backend does not take
    the shape."""
    try:
        return graph_us(lambda: fn(q, k, v, mask), calls=LAYERS)
    except Exception as e:  # a backend that does not take this shape
        print(f"  ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--kv", default="256,1024", help="KV spans (slots)")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--nodes", default="1,16,64", help="new tokens per row")
    args = ap.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    dev, dt = torch.device("cuda"), torch.bfloat16
    Hkv, rep, Dh = 3, 3, 64
    kinds = {"efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION), "math": sdpa_with(SDPBackend.MATH),
             "cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
             "matmul": lambda q, k, v, mask: attend_matmul(q, k, v, ~mask, scale=Dh ** -0.5)}
    rows = []
    names = [*kinds, "matmul+copies", "triton", "triton-1part"]
    print("| batch | tree nodes | KV slots | " + " | ".join(names) + " | max abs diff matmul vs efficient | triton vs matmul | auto picks |")
    print("|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|---|")
    for B in ints(args.batches):
        for N in ints(args.nodes):
            for S in ints(args.kv):
                g = torch.Generator(device=dev).manual_seed(0)
                q = torch.randn(B, Hkv, rep * N, Dh, device=dev, dtype=dt, generator=g)
                k = torch.randn(B, Hkv, S, Dh, device=dev, dtype=dt, generator=g)
                v = torch.randn(B, Hkv, S, Dh, device=dev, dtype=dt, generator=g)
                seen = S // 2 + torch.randint(0, S // 2 - N, (B,), device=dev, generator=g)
                mask = (torch.arange(S, device=dev)[None, :] < seen[:, None])[:, None, None, :].expand(B, 1, rep * N, S)
                mask = mask.contiguous()
                t = {name: time_graph(fn, q, k, v, mask) for name, fn in kinds.items()}
                diff = (kinds["matmul"](q, k, v, mask).float() - kinds["efficient"](q, k, v, mask).float()).abs().max().item()
                # the same queries in the projection's layout: token-major, a view of q/k/v
                qkv = torch.empty(B, N, Hkv * (rep + 2), Dh, device=dev, dtype=dt)
                q4 = qkv[:, :, :Hkv * rep]
                q4.copy_(q.view(B, Hkv, rep, N, Dh).permute(0, 3, 1, 2, 4).reshape(B, N, Hkv * rep, Dh))
                visible = mask[:, 0, :N].contiguous()  # [B, N, S] (every folded row of a token sees the same)

                def with_copies():
                    folded = q4.transpose(1, 2).reshape(B, Hkv, rep * N, Dh)
                    out = attend_matmul(folded, k, v, ~mask, scale=1.0)
                    return out.reshape(B, Hkv * rep, N, Dh).transpose(1, 2).reshape(B, N, Hkv * rep * Dh)

                def fused():
                    return tree_attention(q4, k, v, visible).view(B, N, Hkv * rep * Dh)

                t["matmul+copies"] = graph_us(with_copies, calls=LAYERS)
                t["triton"] = graph_us(fused, calls=LAYERS)
                t["triton-1part"] = graph_us(lambda: tree_attention(q4, k, v, visible, splits=1), calls=LAYERS)
                diff_triton = (fused().float() - with_copies().float()).abs().max().item()
                if attention_choice.use_triton_attention(B, Hkv, rep * N, S, Dh, dt, q.device):
                    auto = "triton"
                else:
                    auto = "matmul" if attention_choice.use_matmul_attention(B, Hkv, rep * N, S, q.device) else "efficient"
                splits = launch_plan(B, Hkv, rep * N, S, sm_count(q.device)).splits
                row = {"batch": B, "nodes": N, "kv": S, "us": t, "max_abs_diff": diff, "max_abs_diff_triton": diff_triton,
                       "auto": auto, "splits": splits}
                rows.append(row)
                cells = " | ".join("-" if x is None else f"{x:.1f}" for x in t.values())
                print(f"| {B} | {N} | {S} | {cells} | {diff:.4f} | {diff_triton:.4f} | {auto} ({splits} part{'s' * (splits > 1)}) |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
