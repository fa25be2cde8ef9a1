"""Load time and peak host memory of medusa.model.loading.load_model on a random checkpoint.

  # write a random checkpoint of a named shape (sharded safetensors, HF layout; --fp8: float8
  # e4m3 projections + per-channel weight_scale, compressed-tensors style config)
  python scripts/load_bench.py write DIR --shape tinyllama-1b [--fp8] [--shard-gb 2]
  # load it in a fresh subprocess and print one JSON line: seconds, peak RSS (ru_maxrss)
  python scripts/load_bench.py load DIR --dtype bfloat16 --device cpu [--quantization fp8]

`load` runs the loader of whichever `medusa` package is first on PYTHONPATH, so the same
command measures two checkouts (before / after a change). Not a test: figures go to the
report / BENCHMARKS.md. Weights are N(0, 0.02) (norms 1); the shape, not the values, matters."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # TinyLlama-1.1B's shape: the 1B class
    "tinyllama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=64),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    D, F, V, Dh = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * Dh, c["num_key_value_heads"] * Dh
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                (p + "self_attn.q_proj.weight", (q, D)), (p + "self_attn.k_proj.weight", (kv, D)),
                (p + "self_attn.v_proj.weight", (kv, D)), (p + "self_attn.o_proj.weight", (D, q)),
                (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                (p + "mlp.down_proj.weight", (D, F))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def write(path: Path, shape: str, fp8: bool, shard_gb: float, device: str) -> None:
    import torch
    from safetensors.torch import save_file

    c = SHAPES[shape]
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    shards, pending, size = [], {}, 0

    def flush():
        nonlocal pending, size
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(path / name))
            shards.append((name, list(pending)))
            pending, size = {}, 0

    for name, shp in tensor_shapes(c):
        if len(shp) == 1:
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = torch.empty(shp, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen)
        if fp8 and any(f".{p}." in name for p in PROJ):
            scale = t.float().abs().amax(dim=1, keepdim=True) / 448.0  # [out, 1]
            pending[name] = (t.float() / scale).to(torch.float8_e4m3fn).cpu()
            pending[name + "_scale"] = scale.cpu()
            size += t.numel()
        else:
            pending[name] = t.cpu()
            size += t.numel() * 2
        if size >= shard_gb * (1 << 30):
            flush()
    flush()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "bos_token_id": 1, "eos_token_id": 2, **c}
    if fp8:
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}},
            "ignore": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def load_here(path: str, dtype: str, device: str, quantization: str | None) -> dict:
    """Load in this process (a fresh one: see `load`) and report time and peak RSS."""
    import torch

    from medusa.model.loading import load_model

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    kw = {"quantization": quantization} if quantization else {}
    model, _ = load_model(path, dtype=getattr(torch, dtype), device=device, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"path": path, "dtype": dtype, "device": device, "quantization": quantization, "seconds": round(seconds, 2),
            "peak_rss_gib": round(peak / 2**20, 3), "rss_before_load_gib": round(rss0 / 2**20, 3),
            "param_gib": round(param_bytes / 2**30, 3),
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None}


def load(path: str, dtype: str, device: str, quantization: str | None) -> dict:
    """`load_here` in a subprocess (ru_maxrss is the process's own peak)."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import load_bench; "
            f"print(json.dumps(load_bench.load_here({path!r}, {dtype!r}, {device!r}, {quantization!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    w.add_argument("--shape", default="tinyllama-1b", choices=list(SHAPES))
    w.add_argument("--fp8", action="store_true")
    w.add_argument("--shard-gb", type=float, default=2.0)
    w.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster)")
    ld = sub.add_parser("load")
    ld.add_argument("dir")
    ld.add_argument("--dtype", default="bfloat16")
    ld.add_argument("--device", default="cpu")
    ld.add_argument("--quantization", default=None)
    a = ap.parse_args()
    if a.cmd == "write":
        write(Path(a.dir), a.shape, a.fp8, a.shard_gb, a.device)
    else:
        print(json.dumps(load(a.dir, a.dtype, a.device, a.quantization)))


if __name__ == "__main__":
    main()
