"""MedusaClient: the blocking face of AsyncMedusaClient. Every call runs the async client's
code on one private event loop thread, so the logic exists once.

Knows asyncio plumbing only."""
from __future__ import annotations

import asyncio
import threading
from typing import Iterator

from medusa.client.aio import _UNSET, AsyncMedusaClient
from medusa.client.types import Delta, GenerateResult


class MedusaClient:
    """`with MedusaClient("host:9000", api_key=...) as c: print(c.generate("Hi").text)`.
    Takes the same arguments as AsyncMedusaClient (except sleep)."""

    def __init__(self, target: str, api_key: str | None = None, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="medusa-client", daemon=True)
        self._thread.start()
        self._aio = AsyncMedusaClient(target, api_key, **kwargs)

    @property
    def attempts(self) -> int:
        return self._aio.attempts

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stream(self, prompt: str | None = None, *, messages=None, timeout=_UNSET, on_final=None, **params) -> Iterator[Delta]:
        agen = self._aio.stream(prompt, messages=messages, timeout=timeout, on_final=on_final, **params)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())  # cancels the RPC if the caller stopped early

    def generate(self, prompt: str | None = None, *, messages=None, timeout=_UNSET, **params) -> GenerateResult:
        return self._run(self._aio.generate(prompt, messages=messages, timeout=timeout, **params))

    def tokenize(self, text: str | None = None, *, messages=None, timeout=_UNSET) -> list[int]:
        return self._run(self._aio.tokenize(text, messages=messages, timeout=timeout))

    def list_models(self, *, timeout=_UNSET) -> list[dict]:
        return self._run(self._aio.list_models(timeout=timeout))

    def health(self, *, timeout=_UNSET) -> tuple[str, dict[str, str]]:
        return self._run(self._aio.health(timeout=timeout))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._aio.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> "MedusaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
