"""Wire messages -> plain values the deployments exchange, and the checks the ingress can make
without the model: session ids, input presence, lengths, stop sequences, speculation switch.
Sampling values are checked by the engine (medusa.decoding.sampling), once.

Knows medusa.v1 messages; nothing of Ray, Redis or the engine's insides."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from medusa.errors import RequestError
from medusa.proto.v1 import medusa_pb2 as pb
from services.config import Settings
from services.logprobs import MAX_TOP

SESSION_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
SPECULATION = {pb.SPECULATION_AUTO: "auto", pb.SPECULATION_ON: "on", pb.SPECULATION_OFF: "off"}
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class GenerateSpec:
    session_id: str | None
    messages: list[dict] | None
    prompt: str | None
    sampling: dict
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    speculation: str = "auto"
    logprobs: int | None = None  # None: none; k: each token's logprob and its top k alternatives
    beams: dict | None = None  # beam search: {beams, length_penalty, early_stopping, num_return} (engine Request fields)


def check_session(session_id: str) -> str | None:
    if not session_id:
        return None
    if not SESSION_RE.match(session_id):
        raise RequestError("session_id must be 1-128 characters of letters, digits and . _ : -")
    return session_id


def input_of(msg) -> tuple[list[dict] | None, str | None]:
    """(messages, prompt) of a GenerateRequest or TokenizeRequest; exactly one is set."""
    kind = msg.WhichOneof("input")
    if kind == "chat":
        msgs = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
        if not msgs:
            raise RequestError("chat has no messages")
        return msgs, None
    if kind in ("prompt", "text"):
        text = getattr(msg, kind)
        if not text:
            raise RequestError("the prompt is empty")
        return None, text
    raise RequestError("the request has no input: set chat messages or a prompt")


def sampling_of(s: pb.SamplingParams) -> dict:
    """Keyword arguments of medusa.decoding.sampling.SamplingParams (0 / empty = default)."""
    d = {"temperature": float(s.temperature)}
    d["rule"] = s.rule or ("greedy" if s.temperature == 0 else "sample")
    if s.top_p:
        d["top_p"] = float(s.top_p)
    if s.top_k:
        d["top_k"] = int(s.top_k)
    if s.posterior_threshold:
        d["posterior_threshold"] = float(s.posterior_threshold)
    if s.posterior_alpha:
        d["posterior_alpha"] = float(s.posterior_alpha)
    if s.HasField("seed"):
        d["seed"] = int(s.seed)
    return d


def parse_generate(req: pb.GenerateRequest, settings: Settings) -> GenerateSpec:
    session = check_session(req.session_id)
    messages, prompt = input_of(req)
    n = req.max_new_tokens or settings.default_max_new_tokens
    if n > settings.max_new_tokens_limit:
        raise RequestError(f"max_new_tokens {n} exceeds this server's limit of {settings.max_new_tokens_limit}")
    if len(req.stop) > settings.max_stop_sequences:
        raise RequestError(f"at most {settings.max_stop_sequences} stop sequences, got {len(req.stop)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in req.stop):
        raise RequestError(f"stop sequences must be 1-{MAX_STOP_CHARS} characters")
    if req.speculation not in SPECULATION:
        raise RequestError(f"unknown speculation value {req.speculation}")
    return GenerateSpec(session, messages, prompt, sampling_of(req.sampling), n, list(req.stop), SPECULATION[req.speculation],
                        logprobs_of(req), beams_of(req))


def beams_of(req: pb.GenerateRequest) -> dict | None:
    """The engine Request's beam fields, None for plain decoding. What the ingress can tell
    without the model is checked here; the engine checks the rest (medusa.decoding.beam)."""
    if req.beams <= 1:
        if req.num_return > 1 or req.HasField("length_penalty") or req.early_stopping:
            raise RequestError("length_penalty, early_stopping and num_return need beams > 1")
        return None
    if req.stop:
        raise RequestError("stop strings are not supported with beam search")
    if req.logprobs:
        raise RequestError("logprobs are not supported with beam search")
    if req.session_id:
        raise RequestError("sessions are not supported with beam search")
    return {"beams": int(req.beams),
            "length_penalty": float(req.length_penalty) if req.HasField("length_penalty") else 1.0,
            "early_stopping": early_stopping_of(req.early_stopping), "num_return": int(req.num_return or 1)}


EARLY_STOPPING = {"": False, "false": False, "true": True, "never": "never"}


def early_stopping_of(v: str) -> bool | str:
    """The wire's early_stopping string as medusa.decoding.beam takes it (no torch import here)."""
    try:
        return EARLY_STOPPING[v.strip().lower()]
    except KeyError:
        raise RequestError(f'early_stopping must be "true", "false" or "never", got {v!r}') from None


def logprobs_of(req: pb.GenerateRequest) -> int | None:
    """The engine's Request.logprobs: None unless asked, else the alternatives wanted (0-MAX_TOP)."""
    if not req.logprobs:
        if req.top_logprobs:
            raise RequestError("top_logprobs needs logprobs set")
        return None
    if req.top_logprobs > MAX_TOP:
        raise RequestError(f"top_logprobs is at most {MAX_TOP} on this server, got {req.top_logprobs}")
    return int(req.top_logprobs)
