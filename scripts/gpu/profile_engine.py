"""Where the batched engine's host time goes at a large batch: cProfile of the scheduler loop
(driven synchronously) over N requests at --max-batch, for the plain engine and the adaptive
one. Run on a lent GPU machine after `source scripts/gpu/env.sh`."""
import argparse
import cProfile
import io
import pstats
import time

from medusa.bench.data import resolve_dataset
from medusa.commands.common import read_prompts
from medusa.decoding.engine import Engine, Request
from medusa.runtime import load_stack

ap = argparse.ArgumentParser()
ap.add_argument("--max-batch", type=int, default=64)
ap.add_argument("--requests", type=int, default=256)
ap.add_argument("--top", type=int, default=30)
args = ap.parse_args()
stack = load_stack(None, heads="default", dtype="bfloat16", device="cuda", progress=False)
_, path = resolve_dataset("mt_bench")
ids = [stack.tokenizer.encode_prompt(p.text) for p in read_prompts(path, None)]
eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
longest = max(map(len, ids)) + 128
for mode in ("ar", "auto"):
    eng = Engine(stack.model, None if mode == "ar" else stack.heads, None if mode == "ar" else stack.tree,
                 max_batch=args.max_batch, max_seq_len=longest)
    eng.warmup(longest, ["ar"] if mode == "ar" else None, measure=mode == "auto")
    for rep in range(2):  # the first pass learns (auto) and warms up; the second is profiled
        hs = [eng.submit(Request(ids[i % len(ids)], max_new_tokens=128, stop_token_ids=eos,
                                 speculation="off" if mode == "ar" else "auto")) for i in range(args.requests)]
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        if rep:
            pr.enable()
        while eng.step():
            pass
        pr.disable()
        wall = time.perf_counter() - t0
    tokens = sum(h.result()[1].new_tokens for h in hs)
    st = eng.stats()
    print(f"== {mode}: {tokens / wall:.0f} tokens/s, steps {st['steps']}, {st['steps_by_tree']}, time {st['time_s']}")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
    print("\n".join(line[:160] for line in s.getvalue().splitlines()[6:]))
