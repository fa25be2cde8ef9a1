"""`medusa bench --through grpc`: the same prompts streamed through the serving cluster (client
SDK -> Serve gRPC proxy -> ingress -> tokenizer / engine replica) and through the batched Engine
driven directly in this process, greedy. At concurrency 1 (the default) one request at a time,
the two paths alternating prompt by prompt; at concurrency C > 1, C clients at once per path, the
paths alternating round by round. Reports per path and level the median time to first token,
the median streamed tokens/s of a request and the aggregate tokens/s of the round, and the
cluster/direct ratios the issue's targets are stated in (tokens/s, TTFT overhead).

    python -m services.bench_grpc --limit 8 --max-new-tokens 64 --out grpc-cpu.json

Knows the client SDK, the Engine API and the launcher; nothing of how either decodes."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _summary(rows: list[dict], wall_s: float | None = None) -> dict:
    out = {"requests": len(rows),
           "ttft_ms_median": round(statistics.median(r["ttft_s"] for r in rows) * 1000, 2),
           "tokens_per_s_median": round(statistics.median(r["tokens"] / r["seconds"] for r in rows if r["seconds"] > 0), 2),
           "tokens": sum(r["tokens"] for r in rows)}
    if wall_s:  # a concurrent round: every token of the round over its wall time
        out["tokens_per_s_total"] = round(out["tokens"] / wall_s, 2)
        out["wall_s"] = round(wall_s, 3)
    return out


def _round(path, prompts: list[str], max_new_tokens: int, concurrency: int) -> tuple[list[dict], list[list[int]], float]:
    """`prompts` through one path by `concurrency` clients at once: (rows, token ids, wall seconds),
    both lists in prompt order."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda p: path(p, max_new_tokens), prompts))
    return [r for r, _ in done], [t for _, t in done], time.perf_counter() - t0


def _level(direct, through, prompts: list[str], max_new_tokens: int, concurrency: int) -> dict:
    """One concurrency level: max(len(prompts), concurrency) requests (the prompts cycled) per path."""
    n = max(len(prompts), concurrency)
    reqs = [prompts[i % len(prompts)] for i in range(n)]
    if concurrency == 1:  # alternate prompt by prompt, so that background drifts hit both paths alike
        rows, same = {"engine": [], "grpc": []}, []
        for p in reqs:
            r1, t1 = direct(p, max_new_tokens)
            r2, t2 = through(p, max_new_tokens)
            rows["engine"].append(r1)
            rows["grpc"].append(r2)
            same.append(t1 == t2)
        grpc, engine = _summary(rows["grpc"]), _summary(rows["engine"])
    else:
        rows_e, toks_e, wall_e = _round(direct, reqs, max_new_tokens, concurrency)
        rows_g, toks_g, wall_g = _round(through, reqs, max_new_tokens, concurrency)
        rows = {"engine": rows_e, "grpc": rows_g}
        same = [a == b for a, b in zip(toks_e, toks_g)]
        grpc, engine = _summary(rows_g, wall_g), _summary(rows_e, wall_e)
    key = "tokens_per_s_total" if concurrency > 1 else "tokens_per_s_median"
    return {
        "concurrency": concurrency, "grpc": grpc, "engine": engine,
        "tokens_per_s_ratio": round(grpc[key] / engine[key], 3),
        "ttft_overhead_ms": round(grpc["ttft_ms_median"] - engine["ttft_ms_median"], 2),
        # paired, so immune to prefill-time noise: client TTFT minus the serving replica's own TTFT
        "ttft_overhead_ms_paired": round(statistics.median(r["ttft_s"] - r["engine_ttft_s"] for r in rows["grpc"]) * 1000, 2),
        "same_tokens": all(same), "requests_with_other_tokens": same.count(False),
    }


class _Direct:
    """The batched Engine in this process, built from the same settings and in the same way as a
    replica (services.app: sizes from engine_sizes, step graphs captured before traffic)."""

    def __init__(self, settings: dict):
        import torch

        from medusa.decoding.engine import Engine
        from medusa.runtime import load_stack
        from services.config import Settings
        from services.engine_replica import engine_sizes

        s = Settings.parse(settings)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        stack = load_stack(s.model, heads=s.heads, tree=s.tree, dtype=s.dtype, device=s.device, progress=False,
                           quantization=s.quantization)
        self.tok = stack.tokenizer
        sizes, _ = engine_sizes(s, stack.model, stack.heads, stack.tree)
        self.engine = Engine(stack.model, stack.heads, stack.tree, **sizes)
        self.eos = tuple(sorted(set(stack.model.cfg.eos_token_ids) | set(stack.tokenizer.eos_token_ids)))
        self.engine.warmup()
        self.engine.start()

    def __call__(self, prompt: str, max_new_tokens: int) -> tuple[dict, list[int]]:
        from medusa.decoding.engine import Request

        ids = self.tok.encode_chat([{"role": "user", "content": prompt}])
        t0 = time.perf_counter()
        toks, ttft = [], None
        for ev in self.engine.submit(Request(ids, max_new_tokens=max_new_tokens, stop_token_ids=self.eos)):
            if ev.tokens and ttft is None:
                ttft = time.perf_counter() - t0
            toks.extend(ev.tokens)
        return {"ttft_s": ttft or 0.0, "seconds": time.perf_counter() - t0, "tokens": len(toks)}, toks

    def close(self) -> None:
        self.engine.stop()


class _Through:
    """The same request streamed through the cluster with the client SDK."""

    def __init__(self, target: str, api_key: str | None):
        from medusa.client import MedusaClient

        self.client = MedusaClient(target, api_key=api_key, timeout=600)

    def __call__(self, prompt: str, max_new_tokens: int) -> tuple[dict, list[int]]:
        t0 = time.perf_counter()
        toks, ttft, final = [], None, []
        for d in self.client.stream(messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                                    on_final=final.append):
            if d.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            toks.extend(d.token_ids)
        row = {"ttft_s": ttft or 0.0, "seconds": time.perf_counter() - t0, "tokens": len(toks)}
        row["engine_ttft_s"] = final[0].stats.ttft_s if final else 0.0  # the serving replica's own submit -> first token
        return row, toks

    def close(self) -> None:
        self.client.close()


def bench_through_grpc(prompts: list[str], *, max_new_tokens: int = 64, settings: dict | None = None,
                       target: str | None = None, api_key: str | None = None, num_cpus: int | None = None,
                       warmup: int = 1, concurrency: list[int] | tuple[int, ...] = (1,)) -> dict:
    """Stream `prompts` (chat, greedy) through the cluster and directly through the Engine at
    each level of `concurrency` (see _level: alternating so that background load drifts hit
    both paths alike).

    target=None starts a local cluster (one engine replica, `settings` as in the serve config's
    args) for the run and stops it after; otherwise `target` (host:port, with api_key) is used
    and only the direct path is built here from `settings`. Returns a JSON-able dict with
    "grpc", "engine" (each: requests, ttft_ms_median, tokens_per_s_median, tokens),
    "tokens_per_s_ratio" (grpc / engine), "ttft_overhead_ms" (grpc - engine medians),
    "ttft_overhead_ms_paired" (median over requests of client TTFT minus the replica's own) and
    "same_tokens" (whether both paths produced identical token ids), those of the first level at
    the top and every level's under "levels" (at C > 1 the ratio is of the rounds' aggregate
    tokens/s, "tokens_per_s_total")."""
    settings = {"device": "cpu", "engine_replicas": 1, **(settings or {})}
    load_before = os.getloadavg()[0]
    cluster = None
    if target is None:
        from services import launch

        cluster = launch.start(dict(settings), grpc_port=_free_port(), num_cpus=num_cpus, env_keys="bench:bench-key")
        target, api_key = cluster.target, "bench-key"
    direct = through = None
    try:
        direct, through = _Direct(settings), _Through(target, api_key)
        for p in prompts[:warmup]:
            direct(p, max_new_tokens)
            through(p, max_new_tokens)
        levels = []
        for c in concurrency:
            levels.append(_level(direct, through, prompts, max_new_tokens, c))
            print(f"bench --through grpc: concurrency {c}: tokens/s ratio {levels[-1]['tokens_per_s_ratio']}, "
                  f"TTFT overhead {levels[-1]['ttft_overhead_ms']} ms, same tokens {levels[-1]['same_tokens']}",
                  file=sys.stderr, flush=True)
    finally:
        for x in (through, direct, cluster):
            if x is not None:
                x.close() if hasattr(x, "close") else x.stop()
    return {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "settings": {k: v for k, v in settings.items() if k != "api_keys"},
        **{k: v for k, v in levels[0].items() if k != "concurrency"}, "levels": levels,
        "cpus": os.cpu_count(), "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _free_port() -> int:
    from medusa.ports import free_port

    return free_port()


def main(argv: list[str] | None = None) -> int:
    from medusa.bench.data import resolve_dataset
    from medusa.commands.common import read_prompts

    p = argparse.ArgumentParser(prog="python -m services.bench_grpc", description=__doc__.splitlines()[0])
    p.add_argument("--prompt-file", default="mt_bench", help="mt_bench (the shipped MT-Bench questions) or a JSONL prompt file")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    prompts = [x.text for x in read_prompts(resolve_dataset(a.prompt_file)[1], a.limit)]
    settings = {"torch_threads": a.torch_threads} if a.torch_threads else {}
    res = bench_through_grpc(prompts, max_new_tokens=a.max_new_tokens, settings=settings)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
