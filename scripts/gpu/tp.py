"""Tensor parallelism on N local GPUs (issue 25's measurements): correctness against one GPU,
then what a TP step costs. Run from the repository root on a machine with >= N GPUs:

    python scripts/gpu/tp.py --tp 2 --shape 7b          # Llama-2-7B shape, random bf16 weights
    python scripts/gpu/tp.py --tp 2 --shape small       # 16 heads / 4 KV heads, quick
    python scripts/gpu/tp.py --tp 2 --model PATH        # an HF checkpoint, each rank reads its slices

Random weights are built from one seed on every rank (the same values), so rank 0 can run the
whole model as the TP 1 reference before sharding; a checkpoint is read whole on rank 0 for the
reference (it must fit one GPU) and by slices for the TP run. What each call prints:

  env      rank r: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (every rank)
  logits   teacher-forced max |TP N - TP 1| over 128 tokens, and the largest |logit| (bf16: expect
           ~1e-2 relative; float32 with --dtype float32: ~1e-4)
  greedy   tokens equal up to the first near-tie (top-2 margin < 0.05 in bf16): equal/compared, and where
  step     ms per plain greedy decode step at batch 1 through the one Engine, with CUDA graphs and
           eager: TP 1 (the whole model) and TP N (medusa.parallel.replica: rank 0's engine, every
           rank replaying its runner's calls over its shard), 64 steps
  graph    ms per captured plain forward (1 token, NCCL all-reduces inside the CUDA graph) and
           whether its hidden state equals the eager one; FAILED with the error if capture fails
  allreduce us per NCCL all-reduce of [1, D] bf16 (the 2 per layer a decode step pays)

The engine's own benchmark at TP N: `medusa bench --concurrency 1,4,16 --tp N`."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())

from medusa.decoding.generate import generate, single_engine  # noqa: E402
from medusa.decoding.step import attention_mask  # noqa: E402
from medusa.model.config import ModelConfig  # noqa: E402
from medusa.model.llama import Transformer  # noqa: E402
from medusa.parallel.comm import NO_MULTICAST  # noqa: E402
from medusa.parallel.launch import launch  # noqa: E402
from medusa.parallel.load import load_sharded  # noqa: E402
from medusa.parallel.replica import replica  # noqa: E402
from medusa.parallel.shard import shard_model  # noqa: E402

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
               num_kv_heads=32, head_dim=128),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=16,
                  num_kv_heads=4, head_dim=64),
}


def _whole(args, device, dtype):
    if args.model:
        from medusa.model.loading import load_model

        return load_model(args.model, dtype=dtype, device=device)[0]
    cfg = ModelConfig(arch="llama", max_position_embeddings=4096, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(device):
        m = Transformer(cfg)
    return m.to(dtype).eval().requires_grad_(False)


def _forward_logits(model, ids):
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)[None]
    mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()[None]
    return model(ids, pos, model.new_cache(1, T), pos, mask).logits.float()


def _greedy_margins(model, prompt, n):
    ids = torch.tensor([prompt + [0] * n], device=model.device)
    toks, margins = [], []
    for i in range(n):
        logits = _forward_logits(model, ids[:, :len(prompt) + i])[0, -1]
        top = logits.topk(2).values
        toks.append(int(logits.argmax()))
        margins.append(float(top[0] - top[1]))
        ids[0, len(prompt) + i] = toks[-1]
    return toks, margins


def _graph_forward(model, dev):
    """Capture one plain 1-token forward (collectives included), replay it; (ms, equal to eager)."""
    cache = model.new_cache(1, 256)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.full((1, 1), 100, device=dev)
    mask = attention_mask(pos[:, 0], torch.ones(1, 1, dtype=torch.bool, device=dev), 128)
    run = lambda: model(tok, pos, cache, pos, mask, logits_for=None).hidden  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager = run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    g.replay()
    torch.cuda.synchronize()
    same = torch.equal(out, eager)
    t0 = time.perf_counter()
    for _ in range(100):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 10, same


def _step_ms(model, prompt, steps, graphs):
    """ms per plain greedy step at batch 1 through the Engine (one warm engine, a warm-up run first)."""
    eng = single_engine(model, None, "ar", max_seq_len=len(prompt) + steps + 8, graphs=graphs)
    list(generate(model, prompt, engine=eng, max_new_tokens=8, stop_token_ids=()))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    list(generate(model, prompt, engine=eng, max_new_tokens=steps + 1, stop_token_ids=()))
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def rank_main(group, args):
    dev, rank = group.device, group.rank
    dtype = getattr(torch, args.dtype)
    print(f"env rank {rank}: " + " ".join(f"{k}={os.environ.get(k)}" for k in NO_MULTICAST), flush=True)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randint(0, 32000 if not args.model else 1000, (1, 128), generator=g)
    prompt = teacher[0, :16].tolist()
    ref = {}
    with torch.inference_mode():
        if rank == 0 or not args.model:
            whole = _whole(args, dev, dtype)
        if rank == 0:
            ref["logits"] = _forward_logits(whole, teacher.to(dev))
            ref["greedy"], ref["margins"] = _greedy_margins(whole, prompt, args.tokens)
            ref["step_ms"] = {gr: _step_ms(whole, prompt, args.steps, gr) for gr in (True, False)}
        if args.model:
            whole = None
            torch.cuda.empty_cache()
            model = load_sharded(args.model, group, dtype)[0]
        else:
            model = shard_model(whole, group)
            torch.cuda.empty_cache()
        logits = _forward_logits(model, teacher.to(dev))  # every rank: the forward's collectives pair up
    with replica(group, model) as driving:
        if driving:
            diff = (logits - ref["logits"]).abs().max().item()
            print(f"logits TP {group.world} vs TP 1: max |diff| {diff:.3e}, max |logit| {ref['logits'].abs().max().item():.3e}")
            eng = single_engine(model, None, "ar", max_seq_len=len(prompt) + args.tokens)
            out = [t for c in generate(model, prompt, engine=eng, max_new_tokens=args.tokens, stop_token_ids=())
                   for t in c.tokens]
            tie = next((i for i, m in enumerate(ref["margins"]) if m < args.tie), args.tokens)
            equal = sum(a == b for a, b in zip(out[:tie], ref["greedy"][:tie]))
            print(f"greedy: {equal}/{tie} equal before the first near-tie"
                  + (f" (at token {tie}, margin {ref['margins'][tie]:.3e})" if tie < args.tokens else " (no near-tie)"))
            for gr in (True, False):
                tp_ms = _step_ms(model, prompt, args.steps, gr)
                print(f"step ms (batch 1, plain greedy, engine {'with CUDA graphs' if gr else 'eager'}): "
                      f"TP 1 {ref['step_ms'][gr]:.2f}, TP {group.world} {tp_ms:.2f}")
    with torch.inference_mode():
        try:
            ms, same = _graph_forward(model, dev)
            if rank == 0:
                print(f"graph: {ms:.3f} ms per captured 1-token forward, equal to eager: {same}")
        except Exception as e:  # noqa: BLE001  (report and go on to the all-reduce timing)
            if rank == 0:
                print(f"graph: FAILED {type(e).__name__}: {e}")
        x = torch.ones(1, model.cfg.hidden_size, dtype=dtype, device=dev)
        for _ in range(10):
            group.all_reduce(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            group.all_reduce(x)
        torch.cuda.synchronize()
        if rank == 0:
            print(f"allreduce: {(time.perf_counter() - t0) * 1e6 / 200:.1f} us per [1, {x.shape[1]}] {args.dtype}")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--model", default=None, help="HF checkpoint directory (instead of a random --shape)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--tie", type=float, default=0.05, help="top-2 margin under which greedy may differ")
    args = ap.parse_args()
    launch(rank_main, args.tp, args, backend="nccl", timeout_s=1800, pg_timeout_s=300)


if __name__ == "__main__":
    main()
