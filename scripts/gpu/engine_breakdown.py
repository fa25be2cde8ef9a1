"""Where the batched engine's time goes under closed-loop load on a GPU: prefill forwards,
verification steps and bookkeeping (Engine.stats()["time_s"]), per mode and concurrency.
Run on a lent GPU machine after `source scripts/gpu/env.sh`."""
import json

from medusa.bench.concurrency import run_concurrency
from medusa.bench.data import resolve_dataset
from medusa.commands.common import read_prompts
from medusa.runtime import load_stack

stack = load_stack(None, heads="default", dtype="bfloat16", device="cuda", progress=False)
_, path = resolve_dataset("mt_bench")
ids = [stack.tokenizer.encode_prompt(p.text) for p in read_prompts(path, None)]
eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
for modes, levels in ((["ar"], [1, 64]), (["spec", "auto"], [64])):
    for r in run_concurrency(stack.model, stack.heads, stack.tree, ids, levels, modes, 128, eos):
        keys = ("mode", "concurrency", "tokens_per_s", "engine_steps", "engine_time_s", "prefill_forwards", "catch_ups", "seconds", "trees")
        print(json.dumps({k: r[k] for k in keys}))
