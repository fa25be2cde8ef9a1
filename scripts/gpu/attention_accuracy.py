"""Error of each attention path in bfloat16 against a float32 reference, on a GPU.

The same bfloat16 queries, keys and values (the model's layout: queries pre-scaled, grouped
kv heads, a causal tree-like visibility) go through
  triton         medusa.kernels.attention.tree_attention (split KV where kv_splits says so)
  triton-1part   the same kernel, span never split
  matmul         attend_matmul with the layer's layout copies (the torch path of the step)
  efficient      SDPA's memory-efficient kernel
and each output is compared with attend_matmul run in float32 on the same (upcast) inputs.
Prints the mean and max absolute error and the mean error relative to the reference's mean
magnitude, per shape and score spread (the std of q.k: about 1-4 in real layers).

  python3 scripts/gpu/attention_accuracy.py [--out FILE]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from medusa.decoding.step import attention_mask
from medusa.kernels.attention import tree_attention
from medusa.model.llama import attend_matmul


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, Hkv, rep, Dh = torch.device("cuda"), 3, 3, 64
    rows = []
    print("| batch | new tokens | KV slots | score std | path | mean abs err | max abs err | mean err / mean |output| |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for B, N, S in ((1, 1, 512), (1, 64, 512), (1, 64, 2048), (8, 16, 1024), (64, 1, 1024)):
        for spread in (1.0, 4.0):
            g = torch.Generator(device=dev).manual_seed(B * 1000 + N + S)
            qkv = torch.randn(B, N, Hkv * (rep + 2), Dh, device=dev, generator=g)
            q = (qkv[:, :, :Hkv * rep] * spread / Dh ** 0.5).to(torch.bfloat16)  # pre-scaled queries
            k = torch.randn(B, Hkv, S, Dh, device=dev, generator=g).to(torch.bfloat16)
            v = torch.randn(B, Hkv, S, Dh, device=dev, generator=g).to(torch.bfloat16)
            start = torch.randint(S // 2, S - N, (B,), device=dev, generator=g)
            local = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
            visible = attention_mask(start, local, S)
            hidden = (~visible)[:, None].repeat(1, 1, rep, 1)

            def folded(qq, kk, vv):
                out = attend_matmul(qq.transpose(1, 2).reshape(B, Hkv, rep * N, Dh), kk, vv, hidden)
                return out.reshape(B, Hkv * rep, N, Dh).transpose(1, 2)

            def efficient(qq, kk, vv):
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    out = F.scaled_dot_product_attention(qq.transpose(1, 2).reshape(B, Hkv, rep * N, Dh), kk, vv,
                                                         attn_mask=~hidden, scale=1.0)
                return out.reshape(B, Hkv * rep, N, Dh).transpose(1, 2)

            ref = folded(q.float(), k.float(), v.float())
            paths = {"triton": lambda: tree_attention(q, k, v, visible),
                     "triton-1part": lambda: tree_attention(q, k, v, visible, splits=1),
                     "matmul": lambda: folded(q, k, v), "efficient": lambda: efficient(q, k, v)}
            scale = ref.abs().mean().item()
            for name, fn in paths.items():
                err = (fn().float() - ref).abs()
                row = {"batch": B, "nodes": N, "kv": S, "spread": spread, "path": name,
                       "mean_abs": err.mean().item(), "max_abs": err.max().item(), "rel_mean": err.mean().item() / scale}
                rows.append(row)
                print(f"| {B} | {N} | {S} | {spread} | {name} | {row['mean_abs']:.2e} | {row['max_abs']:.2e} | {row['rel_mean']:.2e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
