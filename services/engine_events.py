"""The engine's event stream as the ingress reads it (services.ingress): read ahead in a task,
several events merged into one when they arrived while the ingress was busy, and cut with
Unavailable when a drain runs out of time.

Knows the engine's event dicts; nothing of tenants, text or the wire messages."""
from __future__ import annotations

import asyncio

from services.limits import Unavailable

_DONE = object()
_CUT = object()


async def coalesce(stream, cut: asyncio.Event | None = None):
    """The engine's events, read ahead in a task so the engine stream never waits on us, and
    merged (tokens concatenated, the first event's replica and the last one's finish reason and
    stats kept) when several arrived while we were busy, e.g. awaiting detokenisation. One
    detokenise call then covers them all. When `cut` is set (a drain ran out of time) the
    stream ends with Unavailable."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for ev in stream:
                q.put_nowait(ev)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait(e)
            return
        q.put_nowait(_DONE)

    async def watch():
        await cut.wait()
        q.put_nowait(_CUT)

    task = asyncio.create_task(pump())
    watcher = asyncio.create_task(watch()) if cut is not None else None
    try:
        while True:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            merged = None
            for it in items:
                if it is _CUT:
                    raise Unavailable("the server is shutting down and this stream ran past the drain grace period; "
                                      "retry on another instance", 0.5)
                if it is _DONE or isinstance(it, Exception):
                    if merged is not None:
                        yield merged
                    if it is _DONE:
                        return
                    raise it
                if merged is None:
                    merged = dict(it, tokens=list(it.get("tokens", ())))
                    if "logprobs" in it:
                        merged["logprobs"] = list(it["logprobs"])
                else:
                    merged["tokens"].extend(it.get("tokens", ()))
                    if "logprobs" in it:
                        merged.setdefault("logprobs", []).extend(it["logprobs"])
                    merged.update({k: v for k, v in it.items() if k not in ("tokens", "replica", "logprobs")})
            yield merged
    finally:
        task.cancel()
        if watcher is not None:
            watcher.cancel()
