"""Serving throughput of the batched engine (medusa.decoding.engine) under a closed loop:
at concurrency C, C clients each submit a request, wait for its last token and submit the
next, until every prompt ran. Reported per (mode, C): total new tokens/s over the wall time,
per-request latency (submit -> last token, queueing included) p50 / p99, time to first token
p50 / p99, and the mean accepted tokens per step.

Modes: `ar` (an engine without heads), `spec` (speculation on for every request, the
engine's default tree), `auto` (the engine's load-adaptive choice). Knows nothing of files or
progress bars."""
from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from medusa.errors import RequestError

MODES = ("ar", "spec", "auto")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise RequestError(f"--concurrency takes --modes from {', '.join(MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, int(-(-q * len(xs) // 100)) - 1))
    return xs[k]


def step_cost_table(doc: dict | None, context: int | None = None) -> dict | None:
    """The engine's StepCostModel table {(batch, nodes): seconds} from a `medusa bench
    --step-cost` result (eager rows, the context nearest `context`)."""
    if not doc:
        return None
    rows = [r for r in doc.get("rows", []) if not r.get("graphs")]
    if not rows:
        return None
    ctxs = sorted({r["context"] for r in rows})
    ctx = min(ctxs, key=lambda c: abs(c - context)) if context else ctxs[0]
    return {(r.get("batch", 1), r["queries"]): r["seconds_median"] for r in rows if r["context"] == ctx}


def run_level(engine, prompts: list[list[int]], concurrency: int, max_new_tokens: int, speculation: str,
              eos: tuple[int, ...], on_done: Callable[[], None] | None = None) -> dict:
    """Closed loop at `concurrency` over all prompts on a started engine."""
    from medusa.decoding.engine import Request

    todo = list(enumerate(prompts))
    lock = threading.Lock()
    stats = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, ids = todo.pop(0)
            req = Request(ids, max_new_tokens=max_new_tokens, stop_token_ids=eos, speculation=speculation)
            _, st = engine.submit(req).result()
            with lock:
                stats.append(st)
            if on_done:
                on_done()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = [s.seconds for s in stats]
    ttft = [s.ttft_s for s in stats]
    steps = sum(s.steps for s in stats)
    new = sum(s.new_tokens for s in stats)
    r6 = lambda x: None if x is None else round(x, 6)  # noqa: E731
    return {
        "concurrency": concurrency, "requests": len(stats), "new_tokens": new, "seconds": round(wall, 4),
        "tokens_per_s": round(new / wall, 3) if wall > 0 else None,
        "latency_s_p50": r6(percentile(lat, 50)), "latency_s_p99": r6(percentile(lat, 99)),
        "ttft_s_p50": r6(percentile(ttft, 50)), "ttft_s_p99": r6(percentile(ttft, 99)),
        "mean_accepted": round(sum(s.mean_accepted * s.steps for s in stats) / steps, 4) if steps else None,
        "trees": sorted({s.tree for s in stats}),
    }


def _engine_delta(before: dict, after: dict) -> dict:
    """What an engine did between two `stats()` snapshots (one timed run)."""
    return {"engine_steps": after["steps"] - before["steps"],
            "engine_time_s": {k: round(v - before["time_s"].get(k, 0.0), 6) for k, v in after["time_s"].items()},
            "prefill_forwards": after["prefill_forwards"] - before["prefill_forwards"],
            "catch_ups": after["catch_ups"] - before["catch_ups"],
            "steps_by_tree": {k: v - before["steps_by_tree"].get(k, 0) for k, v in after["steps_by_tree"].items()
                              if v - before["steps_by_tree"].get(k, 0)}}


def run_concurrency(model, heads, tree, prompts: list[list[int]], levels: list[int], modes: list[str],
                    max_new_tokens: int, eos: tuple[int, ...], requests: int | None = None,
                    step_cost: dict | None = None, on_done: Callable[[], None] | None = None,
                    graphs: bool | None = None, on_prepare: Callable[[int, int], None] | None = None,
                    repeats: int = 1) -> list[dict]:
    """One row per (mode, level). Each level gets one fresh engine per mode (max_batch = level),
    its CUDA graphs captured (and for auto its step costs measured) before the clock starts
    (Engine.warmup; nothing on a CPU, where the policy measures each step cost when it first
    needs it), and one untimed warm-up request. Then `repeats` rounds time every mode's engine in turn (the order
    reversed every other round), so that the modes see the same machine state side by side.
    A row reports the run of median tokens/s (the lower of the two middle runs when `repeats` is
    even), every run's tokens/s, and `speedup_vs_ar`: the median over rounds of the run's tokens/s
    over the `ar` run of the same round.
    on_prepare(done, total) follows each engine's warm-up."""
    from medusa.decoding.engine import Engine, Request

    if repeats < 1:
        raise RequestError(f"--repeats must be >= 1, got {repeats}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    spec_of = {"ar": "off", "spec": "on", "auto": "auto"}
    rows = []
    for c in levels:
        n = requests or max(8, 2 * c)
        batch = [prompts[i % len(prompts)] for i in range(n)]
        engines = {}
        try:
            for mode in modes:
                engine = Engine(model, None if mode == "ar" else heads, None if mode == "ar" else tree,
                                max_batch=c, max_seq_len=longest, step_cost=step_cost, graphs=graphs)
                engines[mode] = engine
                if engine.runner.capture:
                    engine.warmup(longest, ["ar"] if mode == "ar" else [engine.default_tree.name] if mode == "spec" else None,
                                  measure=mode == "auto", progress=on_prepare)
                engine.start()
                engine.submit(Request(batch[0], max_new_tokens=min(8, max_new_tokens), stop_token_ids=eos,
                                      speculation=spec_of[mode])).result()
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for rnd in range(repeats):
                for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                    engine = engines[mode]
                    before = engine.stats()
                    row = run_level(engine, batch, c, max_new_tokens, spec_of[mode], eos, on_done)
                    row.update(step_mode=before["step_mode"], **_engine_delta(before, engine.stats()))
                    runs[mode].append(row)
        finally:
            for engine in engines.values():
                engine.stop()
        for mode in modes:
            speeds = [r["tokens_per_s"] or 0.0 for r in runs[mode]]
            mid = sorted(range(repeats), key=lambda i: speeds[i])[(repeats - 1) // 2]
            row = {"mode": mode, **runs[mode][mid], "repeats": repeats, "tokens_per_s_runs": speeds}
            if "ar" in runs:
                ratios = [s / a["tokens_per_s"] for s, a in zip(speeds, runs["ar"]) if a["tokens_per_s"]]
                row["speedup_vs_ar"] = round(statistics.median(ratios), 3) if ratios else None
                row["speedup_vs_ar_runs"] = [round(x, 3) for x in ratios]
            else:
                row["speedup_vs_ar"] = None
            rows.append(row)
    order = {m: i for i, m in enumerate(modes)}
    return sorted(rows, key=lambda r: (order[r["mode"]], levels.index(r["concurrency"])))


def concurrency_markdown(doc: dict) -> str:
    from medusa.bench.report import header_lines

    lines = [f"### Concurrency on {doc['device']}", ""]
    lines += header_lines(doc)
    repeats = max((r.get("repeats", 1) for r in doc["rows"]), default=1)
    tp = doc.get("tensor_parallel", 1)
    lines += ["", f"Model {doc['model']}" + (f" sharded over {tp} ranks (--tp {tp})" if tp > 1 else "")
              + f", dtype {doc['dtype']}, heads {doc['heads']}, tree {doc['tree']}, "
              f"{doc['dataset']} prompts, up to {doc['max_new_tokens']} new tokens, closed loop"
              + (f"; {repeats} runs per cell, the modes' warm engines alternating: tokens/s is the median run "
                 "(the lower middle one for an even count), "
                 "vs ar the median of the runs' ratios to the ar run beside them." if repeats > 1 else "."), ""]
    lines.append("| mode | concurrency | requests | total tokens/s | vs ar | latency p50 (s) | latency p99 (s) "
                 "| TTFT p50 (s) | accepted/step | trees |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    f = lambda x, s=".3f": "-" if x is None else format(x, s)  # noqa: E731
    for r in doc["rows"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {f(r['tokens_per_s'], '.2f')} | "
                     f"{f(r['speedup_vs_ar'], '.2f')} | {f(r['latency_s_p50'])} | {f(r['latency_s_p99'])} | "
                     f"{f(r['ttft_s_p50'])} | {f(r['mean_accepted'], '.2f')} | {', '.join(r['trees'])} |")
    return "\n".join(lines) + "\n"
