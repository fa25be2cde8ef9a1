"""Where the batched engine's time goes under closed-loop load on a GPU (prefill, steps, bookkeeping).
Run after `source scripts/gpu/env.sh`."""
import sys, time, torch, json
from medusa.runtime import load_stack
from medusa.bench.concurrency import run_concurrency
from medusa.bench.data import resolve_dataset
from medusa.commands.common import read_prompts
s = load_stack(None, heads="default", dtype="bfloat16", device="cuda", progress=False)
label, path = resolve_dataset("mt_bench")
ps = read_prompts(path, None)
ids = [s.tokenizer.encode_prompt(p.text) for p in ps]
eos = tuple(sorted(set(s.model.cfg.eos_token_ids) | set(s.tokenizer.eos_token_ids)))
for modes, levels in ((["ar"], [1, 64]), (["spec", "auto"], [64])):
    rows = run_concurrency(s.model, s.heads, s.tree, ids, levels, modes, 128, eos)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("mode", "concurrency", "tokens_per_s", "engine_steps", "engine_time_s", "prefill_forwards", "seconds", "trees")}))
