"""Self-distillation: the base model writes the responses its draft heads learn from.

Jobs (prompt ids + greedy or sampled) go to the batched Engine (speculation off: plain
decoding through the one decode step); finished responses are appended to a JSONL file as
they arrive, so an interrupted run loses at most the responses in flight and a rerun skips
every id already written. At a time limit the responses in flight are cut and kept when long
enough: a prefix of the base model's own response is as good a training sequence. Knows token ids only (the caller applies the chat template) and
reports progress through a callback."""
from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medusa.decoding.sampling import SamplingParams
from medusa.training.data import Record, done_ids


MIN_PARTIAL = 32  # a response cut by the time limit is kept (as a prefix of a real response) from this many tokens


@dataclass(frozen=True)
class DistillJob:
    id: str  # record id: "<prompt id>:<mode>"
    mode: str  # "greedy" | "sample"
    prompt_ids: list[int]


@dataclass(frozen=True)
class DistillSummary:
    written: int  # responses written by this run
    skipped: int  # jobs already in the file
    failed: int  # jobs that ended with an error or were cut by the time limit
    tokens: int  # response tokens written by this run
    seconds: float


def sampling_for(job: DistillJob, temperature: float, seed: int) -> SamplingParams:
    if job.mode == "greedy":
        return SamplingParams()
    return SamplingParams(temperature=temperature, rule="sample", seed=(seed * 7919 + zlib.crc32(job.id.encode())) & 0x7FFFFFFF)


def distill(engine, jobs: list[DistillJob], out_path: str | Path, *, max_new_tokens: int = 512, temperature: float = 0.7,
            seed: int = 0, stop_token_ids: tuple[int, ...] | None = None, window: int = 64,
            time_limit: float | None = None, progress: Callable[[int, int], None] | None = None) -> DistillSummary:
    """Generate a response for every job not yet in `out_path` (appending JSONL records).
    `engine` is a started medusa.decoding.engine.Engine; `window` bounds requests in flight
    (a little above the engine's batch keeps its rows full). progress(jobs_written, tokens)
    is called once per written response."""
    t0 = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    todo = [j for j in jobs if j.id not in done]
    with open(out_path, "a") as f:
        written, failed, ntok = asyncio.run(_run(engine, todo, f, max_new_tokens, temperature, seed, stop_token_ids,
                                                 max(window, 1), time_limit, progress))
    return DistillSummary(written, len(jobs) - len(todo), failed, ntok, time.perf_counter() - t0)


async def _run(engine, todo, f, max_new_tokens, temperature, seed, stop_token_ids, window, time_limit, progress):
    from medusa.decoding.engine import Request

    sem = asyncio.Semaphore(window)
    handles: dict[str, object] = {}
    expired = False
    counts = [0, 0, 0]  # written, failed, tokens

    async def one(job: DistillJob) -> None:
        async with sem:
            if expired:
                counts[1] += 1
                return
            req = Request(job.prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling_for(job, temperature, seed),
                          stop_token_ids=stop_token_ids, speculation="off", request_id=f"distill-{job.id}")
            h = handles[job.id] = engine.submit(req)
            tokens, reason = [], None
            async for ev in h:
                tokens.extend(ev.tokens)
                reason = ev.finish_reason
            handles.pop(job.id, None)
            cut_at_deadline = expired and reason == "cancelled" and len(tokens) >= MIN_PARTIAL
            if reason not in ("eos", "stop", "length") and not cut_at_deadline:
                counts[1] += 1
                return
            f.write(Record(job.id, job.mode, job.prompt_ids, tokens).to_json() + "\n")
            f.flush()
            counts[0] += 1
            counts[2] += len(tokens)
            if progress:
                progress(counts[0], len(tokens))

    async def expire() -> None:  # at the deadline: no new requests; the ones in flight are cut (long prefixes kept)
        nonlocal expired
        await asyncio.sleep(time_limit)
        expired = True
        for h in list(handles.values()):
            h.cancel()

    timer = asyncio.create_task(expire()) if time_limit else None
    await asyncio.gather(*(one(j) for j in todo))
    if timer:
        timer.cancel()
    return counts[0], counts[1], counts[2]
