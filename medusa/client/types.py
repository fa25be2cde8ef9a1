"""What the SDK hands back (deltas, usage, stats, results) and the pure translation between
them and the wire messages: building a GenerateRequest, folding a response stream.

No I/O here; the async client drives it, the sync client reuses the async one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from medusa.proto.v1 import medusa_pb2 as pb

SPECULATION = {"auto": pb.SPECULATION_AUTO, "on": pb.SPECULATION_ON, "off": pb.SPECULATION_OFF}


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the base model's raw distribution (before temperature
    and top-p) and, when asked, the most likely tokens there (best first)."""

    token_id: int
    token: str  # the token's text alone
    logprob: float
    text_offset: int = 0  # where its text starts in the generated text
    top: tuple["TokenLogprob", ...] = ()

    @classmethod
    def of(cls, m: pb.TokenLogprob) -> "TokenLogprob":
        return cls(m.token_id, m.token, m.logprob, m.text_offset, tuple(cls.of(t) for t in m.top_logprobs))


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs=k: the tokens whose text came out


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0


@dataclass(frozen=True)
class SpecStats:
    steps: int = 0
    mean_accepted: float = 0.0
    tree: str = ""
    ttft_s: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    stats: SpecStats
    request_id: str = ""
    replica_id: str = ""
    logprobs: list[TokenLogprob] | None = None  # with logprobs=k: one per token of the text
    beams: list[BeamResult] | None = None  # with beams=K > 1: the num_return best beams, best first


@dataclass(frozen=True)
class BeamResult:
    token_ids: list[int]
    text: str
    score: float  # sum of log-probabilities / length ** length_penalty


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[dict[str, str]] | None = None,
    session_id: str = "",
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    rule: str = "",
    seed: int | None = None,
    stop: Sequence[str] = (),
    speculation: str = "auto",
    model: str = "",
    logprobs: int | None = None,
    beams: int = 1,
    length_penalty: float | None = None,
    early_stopping: bool | str = False,
    num_return: int = 1,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments: exactly one of `prompt` (raw text) or
    `messages` (chat, [{"role", "content"}]). logprobs: None, or the alternatives per token
    (0-5) to return with each token's log-probability. beams > 1: beam search (greedy; with
    length_penalty, early_stopping True / False / "never", num_return beams in the result).
    Values are checked by the server."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt= (raw text) or messages= (chat)")
    if speculation not in SPECULATION:
        raise ValueError(f"speculation must be one of {', '.join(SPECULATION)}, got {speculation!r}")
    sampling = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, rule=rule)
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(session_id=session_id, sampling=sampling, max_new_tokens=max_new_tokens,
                             stop=list(stop), speculation=SPECULATION[speculation], model=model)
    if logprobs is not None:
        req.logprobs, req.top_logprobs = True, logprobs
    req.beams, req.num_return = beams, num_return if num_return != 1 else 0
    req.early_stopping = str(early_stopping).lower() if early_stopping is not False else ""
    if length_penalty is not None:
        req.length_penalty = length_penalty
    if prompt is not None:
        req.prompt = prompt
    else:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    return req


@dataclass
class StreamFold:
    """Folds GenerateResponse messages into deltas and, at the end, one GenerateResult."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    final: GenerateResult | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    asked: bool = False  # the request asked for logprobs

    @property
    def started(self) -> bool:
        """Whether any token arrived (after which a call is never retried)."""
        return bool(self.token_ids) or self.final is not None

    def push(self, resp: pb.GenerateResponse) -> Delta | None:
        kind = resp.WhichOneof("event")
        if kind == "delta":
            d = Delta(resp.delta.text, list(resp.delta.token_ids), [TokenLogprob.of(m) for m in resp.delta.logprobs])
            self.text.append(d.text)
            self.token_ids.extend(d.token_ids)
            self.logprobs.extend(d.logprobs)
            return d
        if kind == "final":
            f = resp.final
            self.final = GenerateResult(
                text="".join(self.text), token_ids=list(self.token_ids), finish_reason=f.finish_reason,
                usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens, f.usage.reused_prompt_tokens),
                stats=SpecStats(f.stats.steps, f.stats.mean_accepted, f.stats.tree, f.stats.ttft_s, f.stats.seconds),
                request_id=f.request_id, replica_id=f.replica_id, logprobs=list(self.logprobs) if self.asked else None,
                beams=[BeamResult(list(b.token_ids), b.text, b.score) for b in f.beams] or None)
        return None
