"""What a caller hands the engine and gets back: the request (token ids, sampling, stopping,
speculation switch, session), its stream of TokenEvents (RequestHandle: iterate it, or `async
for` it, or `result()`), the final RequestStats; and the engine's own record of a request in
flight (Live) with its seeded uniforms.

The handle talks to the engine through its public methods only (step, cancel, threaded). This
module knows token ids, never text; it runs nothing on a model."""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from medusa.decoding.beam import BeamParams, Hypothesis, check_params
from medusa.decoding.logprobs import MAX_TOP, TOP_COMPUTED, TokenLogprob
from medusa.decoding.lookup import NgramLookup
from medusa.decoding.sampling import SamplingParams, draw_uniforms
from medusa.errors import RequestError

SPECULATION = ("auto", "on", "off")


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] | None = None  # None -> the model's EOS ids
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id stop sequences
    speculation: str = "auto"  # "on" | "off" | "auto"
    session_id: str | None = None  # KV reuse across turns (namespaced by the caller)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # per-token log-probabilities: None = none; k in 0..MAX_TOP = each emitted token's logprob
    # under the base model's raw distribution (before temperature / top-p) plus its top k
    logprobs: int | None = None
    # beam search (beam.py, engine/beams.py): beams > 1 decodes K beams (greedy sampling only);
    # 1 is plain decoding, as HF's num_beams=1 is greedy search
    beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never"
    num_return: int = 1  # finished beams on the final event (TokenEvent.beams), best first


@dataclass(frozen=True)
class RequestStats:
    prompt_tokens: int
    new_tokens: int
    steps: int  # verification steps the request took part in (prefill excluded)
    mean_accepted: float  # tokens per step (accepted candidates + bonus; 1.0 = plain)
    reused_tokens: int  # prompt tokens served from a kept session KV (0 = full prefill)
    ttft_s: float  # submit -> first token (queueing included)
    seconds: float  # submit -> last token
    tree: str  # last tree used ("ar" when plain)
    queue_s: float = 0.0  # submit -> admission (its prefill starts)
    beam_steps: tuple[int, ...] = ()  # beam search: the beam steps each verification step ran


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    tokens: list[int]  # new tokens (may be empty on the final event)
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled" | "error" on the last event
    stats: RequestStats | None = None  # on the last event only
    produced: int = 0  # tokens the forward behind this event produced, before any stop cut (0: none ran)
    logprobs: list[TokenLogprob] | None = None  # one per token of `tokens`, when the request asked
    beams: tuple[Hypothesis, ...] | None = None  # a beam request's final event: num_return hypotheses, best first


class RequestHandle:
    """The stream of one request's TokenEvents. Iterating an engine that has no scheduler thread
    (no `start()`) drives it synchronously."""

    def __init__(self, engine, request_id: str):
        self.request_id = request_id
        self._engine = engine
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    def push(self, ev: TokenEvent) -> None:  # engine side
        with self._lock:
            if self._async is not None:
                loop, aq = self._async
                loop.call_soon_threadsafe(aq.put_nowait, ev)
            else:
                self._q.put(ev)

    def _next(self) -> TokenEvent:
        while True:
            try:
                return self._q.get_nowait()
            except queue.Empty:
                pass
            if not self._engine.threaded:
                if not self._engine.step() and self._q.empty():
                    raise RuntimeError(f"request {self.request_id} is not known to the engine")
            else:
                try:
                    return self._q.get(timeout=0.1)
                except queue.Empty:
                    continue

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._next()
            yield ev
            if ev.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while True:
                try:
                    aq.put_nowait(self._q.get_nowait())
                except queue.Empty:
                    break
            self._async = (loop, aq)
        while True:
            if aq.empty() and not self._engine.threaded:
                if not await asyncio.to_thread(self._engine.step) and aq.empty():
                    await asyncio.sleep(0)  # events pushed from the worker thread arrive via the loop
                    if aq.empty():
                        raise RuntimeError(f"request {self.request_id} is not known to the engine")
                continue
            ev = await aq.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop the request. Its row is freed at once, or at the end of the step running now;
        the final event says "cancelled". Cancelling a finished request does nothing."""
        self._engine.cancel(self.request_id)

    def result(self) -> tuple[list[int], RequestStats]:
        tokens: list[int] = []
        stats = None
        for ev in self:
            tokens.extend(ev.tokens)
            stats = ev.stats
        return tokens, stats


# ------------------------------------------------------------------ per-request bookkeeping

class Uniforms:
    """A request's seeded uniforms, indexed by output position."""

    CHUNK = 256

    def __init__(self, seed: int, device):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.buf = torch.empty(0, device=self.device)

    def at(self, first: int, offsets: torch.Tensor, max_offset: int) -> torch.Tensor:
        """Uniforms for output positions first + offsets ([N] long, at most max_offset)."""
        while self.buf.numel() <= first + max_offset:
            self.buf = torch.cat([self.buf, draw_uniforms([self.gen], self.CHUNK, self.device)[0]])
        return self.buf[first + offsets]


@dataclass(eq=False)
class Live:
    req: Request
    handle: RequestHandle
    eos: set
    t_submit: float
    uniforms: Uniforms | None
    row: int = -1
    out: list[int] = field(default_factory=list)  # every token produced (may run past the cut)
    sent: int = 0
    reused: int = 0
    steps: int = 0
    step_tokens: int = 0
    t_first: float = 0.0
    tree: str = "ar"
    lookup: NgramLookup | None = None  # the sequence's n-grams, from its first step with a lookup chain
    shadow: list = field(default_factory=list)  # (output index, draft, heads' accepted) of steps whose chain went unrun
    queued_step: int = 0  # engine step count at submission (admission coalescing)
    t_admit: float = 0.0  # when it left the waiting queue (its prefill starts)
    logprobs: list = field(default_factory=list)  # TokenLogprob per token of `out`, when the request asked
    # unique for the process's life: keys the batch's loaded sampling parameters (an id() would
    # be reused by a later request allocated where a finished one was, which would then decode
    # with the finished one's temperature, top-p and rule)
    serial: int = field(default_factory=itertools.count().__next__)

    @property
    def kv_len(self) -> int:  # committed KV slots (the last produced token is not in the cache yet)
        return len(self.req.prompt_ids) + len(self.out) - 1


def validate(r: Request, vocab: int, max_seq_len: int) -> None:
    """One RequestError naming what is wrong with `r`, if anything."""
    if not isinstance(r, Request):
        raise RequestError("submit() takes a Request")
    if not r.prompt_ids:
        raise RequestError("the prompt is empty")
    if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab:
        raise RequestError("prompt holds token ids outside the vocabulary")
    if r.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    total = len(r.prompt_ids) + r.max_new_tokens
    if total > max_seq_len:
        raise RequestError(f"prompt ({len(r.prompt_ids)} tokens) + max_new_tokens ({r.max_new_tokens}) = {total} "
                           f"exceeds the engine's max_seq_len of {max_seq_len} tokens")
    if r.speculation not in SPECULATION:
        raise RequestError(f"speculation must be one of {', '.join(SPECULATION)}, got {r.speculation!r}")
    if not isinstance(r.sampling, SamplingParams):
        raise RequestError("sampling must be a SamplingParams")
    if any(not s for s in r.stop_sequences):
        raise RequestError("stop sequences must be non-empty")
    if r.logprobs is not None and (isinstance(r.logprobs, bool) or not isinstance(r.logprobs, int)
                                   or not 0 <= r.logprobs <= MAX_TOP):
        raise RequestError(f"logprobs (top alternatives per token) must be an integer 0-{MAX_TOP} or None, got {r.logprobs!r}")


def beam_params(r: Request) -> BeamParams:
    return BeamParams(r.beams, r.length_penalty, r.early_stopping, r.num_return)


def validate_beams(r: Request, n_eos: int) -> None:
    """What beam search supports (engine/beams.py): greedy scores only, the whole output at the end."""
    check_params(beam_params(r), n_eos, TOP_COMPUTED)
    if not r.sampling.greedy:
        raise RequestError("beam search is greedy: temperature must be 0 with beams > 1")
    if r.stop_sequences:
        raise RequestError("stop sequences are not supported with beam search (stop token ids are)")
    if r.logprobs is not None:
        raise RequestError("logprobs are not supported with beam search")
    if r.session_id is not None:
        raise RequestError("sessions are not supported with beam search")
