"""Plain vs adaptive speculation at one concurrency, side by side: one engine per mode, warmed
up once, then runs of `--requests` closed-loop requests alternating ar / auto, so that both see
the same machine state. Prints one JSON line per run and writes them all to --out.
Run on a lent GPU machine after `source scripts/gpu/env.sh`."""
import argparse
import json
import statistics

from medusa.bench.concurrency import run_level
from medusa.bench.data import resolve_dataset
from medusa.commands.common import read_prompts
from medusa.decoding.engine import Engine, Request
from medusa.runtime import load_stack

ap = argparse.ArgumentParser()
ap.add_argument("--concurrency", type=int, default=64)
ap.add_argument("--requests", type=int, default=256)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--max-new-tokens", type=int, default=128)
ap.add_argument("--out", required=True)
args = ap.parse_args()

stack = load_stack(None, heads="default", dtype="bfloat16", device="cuda", progress=False)
_, path = resolve_dataset("mt_bench")
ids = [stack.tokenizer.encode_prompt(p.text) for p in read_prompts(path, None)]
eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
longest = max(map(len, ids)) + args.max_new_tokens
batch = [ids[i % len(ids)] for i in range(args.requests)]
engines = {}
for mode in ("ar", "auto"):
    eng = Engine(stack.model, None if mode == "ar" else stack.heads, None if mode == "ar" else stack.tree,
                 max_batch=args.concurrency, max_seq_len=longest)
    eng.warmup(longest, ["ar"] if mode == "ar" else None, measure=mode == "auto")
    eng.start()
    eng.submit(Request(batch[0], max_new_tokens=8, stop_token_ids=eos)).result()
    engines[mode] = eng
runs = []
for rep in range(args.repeats):
    for mode, eng in engines.items():
        before = eng.stats()
        row = run_level(eng, batch, args.concurrency, args.max_new_tokens, "off" if mode == "ar" else "auto", eos)
        after = eng.stats()
        row.update(mode=mode, repeat=rep, steps=after["steps"] - before["steps"],
                   steps_by_tree={k: v - before["steps_by_tree"].get(k, 0) for k, v in after["steps_by_tree"].items()},
                   prefill_forwards=after["prefill_forwards"] - before["prefill_forwards"],
                   catch_ups=after["catch_ups"] - before["catch_ups"],
                   time_s={k: round(after["time_s"][k] - before["time_s"][k], 3) for k in after["time_s"]})
        runs.append(row)
        print(json.dumps({k: row[k] for k in ("mode", "repeat", "tokens_per_s", "steps", "prefill_forwards",
                                              "catch_ups", "time_s", "steps_by_tree") if k in row}), flush=True)
auto = engines["auto"]
print("auto: seeded step ms", {f"{b}x{n}": round(v * 1e3, 2) for (b, n), v in sorted(auto.cost.seeded.items())})
print("auto: measured step ms", {f"{b}x{n}": round(v * 1e3, 2) for (b, n), v in sorted(auto.cost.online.items())})
print("auto: acceptance", auto.stats()["acceptance"], "last choice", auto.stats()["speculation"])
for eng in engines.values():
    eng.stop()
ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[::2], runs[1::2])]
summary = {mode: statistics.median(r["tokens_per_s"] for r in runs if r["mode"] == mode) for mode in engines}
print("median tokens/s", summary, "auto/ar per pair", [round(x, 3) for x in ratios], "median", round(statistics.median(ratios), 3))
json.dump({"concurrency": args.concurrency, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
           "runs": runs, "auto_vs_ar_per_pair": ratios, "median_tokens_per_s": summary}, open(args.out, "w"), indent=1)
