"""OpenAI's JSON schema on this server's side: the request bodies of /v1/chat/completions and
/v1/completions (pydantic models), their validation and translation into the medusa.v1
GenerateRequest the gRPC path runs, and the shapes of the responses and stream chunks built
from the medusa.v1 messages that come back (services.openai_api serves them over HTTP).

The extra fields (`session_id`, `speculation`; the response's `medusa`) are described in
services.openai_api.

Knows OpenAI's schema and the wire messages; nothing of HTTP, tenants, engines or tokenizers."""
from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medusa.proto.v1 import medusa_pb2 as pb
from services.logprobs import MAX_TOP

MAX_LOGPROBS = MAX_TOP  # alternatives per token (OpenAI allows 20 for chat; the engine returns at most 5)


# ----------------------------------------------------------------- requests


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts are understood
            if any(p.get("type") != "text" for p in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not know are ignored, as OpenAI's own servers do

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    n: int = 1
    logprobs: bool | int | None = None  # chat: bool (with top_logprobs); completions: int 0-5
    top_logprobs: int | None = Field(None, ge=0)
    session_id: str | None = None
    speculation: Literal["auto", "on", "off"] | None = None
    # beam search extension (greedy; `n` <= beams choices, best first; not with stream / logprobs)
    beams: int | None = Field(None, ge=1)
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None


class ChatCompletionRequest(_Common):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[str]


SPECULATION = {None: pb.SPECULATION_AUTO, "auto": pb.SPECULATION_AUTO, "on": pb.SPECULATION_ON, "off": pb.SPECULATION_OFF}


class BadRequest(Exception):
    """A body this server refuses beyond what the models check (HTTP 400); param: the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def to_generate_request(body: _Common, session_header: str | None) -> pb.GenerateRequest:
    """An OpenAI request -> the medusa.v1 request the gRPC path runs."""
    beams = _beams(body)
    if body.n != 1 and not beams:
        raise BadRequest(f"n must be 1 (this server returns one choice; n up to beams with beam search), got {body.n}", "n")
    top = _logprobs(body)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = pb.SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                 top_p=body.top_p or 0.0)
    if body.seed is not None:
        sampling.seed = body.seed
    req = pb.GenerateRequest(model=body.model or "", session_id=session_header or body.session_id or "", sampling=sampling,
                             max_new_tokens=body.max_completion_tokens or body.max_tokens or 0,
                             stop=stops, speculation=SPECULATION[body.speculation])
    if top is not None:
        req.logprobs, req.top_logprobs = True, top
    if beams:
        req.sampling.temperature = 0.0  # beam search is greedy (a temperature > 0 was refused)
        req.beams, req.num_return = beams, body.n
        req.early_stopping = {True: "true", False: "false", "never": "never", None: ""}[body.early_stopping]
        if body.length_penalty is not None:
            req.length_penalty = body.length_penalty
    if isinstance(body, ChatCompletionRequest):
        try:
            msgs = [pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages]
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        req.chat.CopyFrom(pb.Conversation(messages=msgs))
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("prompt must be one string (batches of prompts are not supported)", "prompt")
            prompt = prompt[0]
        req.prompt = prompt
    return req


def _beams(body: _Common) -> int | None:
    """The beam count of a beam-search request (None: plain decoding); what beam search cannot
    do is a 400 naming the field."""
    if not body.beams or body.beams == 1:
        for name in ("length_penalty", "early_stopping"):
            if getattr(body, name) is not None:
                raise BadRequest(f"{name} needs beams > 1", name)
        return None
    if body.stream:
        raise BadRequest("beam search cannot stream: the best beam is known only at the end (use stream: false)", "stream")
    if body.temperature:
        raise BadRequest("beam search is greedy: temperature must be 0 or unset with beams", "temperature")
    if body.logprobs:
        raise BadRequest("logprobs are not supported with beam search", "logprobs")
    if not 1 <= body.n <= body.beams:
        raise BadRequest(f"n must be 1..beams ({body.beams}) with beam search, got {body.n}", "n")
    if body.length_penalty is not None and not math.isfinite(body.length_penalty):
        raise BadRequest("length_penalty must be a finite number", "length_penalty")
    return body.beams


def _logprobs(body: _Common) -> int | None:
    """The alternatives per token the request asks for, None without logprobs. Chat:
    `logprobs: true` and `top_logprobs` 0-5; completions: `logprobs` 0-5 (OpenAI's shapes)."""
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise BadRequest("logprobs must be true or false for chat completions (top_logprobs sets the alternatives)",
                             "logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        if not body.logprobs:
            return None
        top = body.top_logprobs or 0
        if top > MAX_LOGPROBS:
            raise BadRequest(f"top_logprobs must be at most {MAX_LOGPROBS} on this server, got {top}", "top_logprobs")
        return top
    if body.top_logprobs is not None:
        raise BadRequest("top_logprobs is a chat completions field; completions take logprobs: 0-"
                         f"{MAX_LOGPROBS}", "top_logprobs")
    if body.logprobs is None or body.logprobs is False:
        return None
    if isinstance(body.logprobs, bool) or not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise BadRequest(f"logprobs must be an integer 0-{MAX_LOGPROBS} for completions, got {body.logprobs!r}", "logprobs")
    return body.logprobs


# ----------------------------------------------------------------- responses

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(final: pb.Final) -> dict:
    u = final.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.reused_prompt_tokens}}


def extras(final: pb.Final) -> dict:
    st = final.stats
    return {"steps": st.steps, "mean_accepted": round(st.mean_accepted, 4), "tree": st.tree, "ttft_s": round(st.ttft_s, 4),
            "seconds": round(st.seconds, 4), "replica_id": final.replica_id,
            "reused_prompt_tokens": final.usage.reused_prompt_tokens, "finish_reason": final.finish_reason,
            "request_id": final.request_id}


def _chat_logprob(e: pb.TokenLogprob) -> dict:
    return {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode("utf-8"))}


class Shape:
    """The chat or the text-completion flavour of responses and chunks."""

    def __init__(self, chat: bool, model: str, request_id: str, logprobs: bool = False):
        self.chat, self.model, self.asked = chat, model, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, entries) -> dict | None:
        """OpenAI's `choices[].logprobs` for these medusa.v1 TokenLogprobs (None when not asked)."""
        if not self.asked:
            return None
        if self.chat:
            return {"content": [dict(_chat_logprob(e), top_logprobs=[_chat_logprob(t) for t in e.top_logprobs])
                                for e in entries]}
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
                "text_offset": [e.text_offset for e in entries]}

    def response(self, text: str, final: pb.Final, entries=()) -> dict:
        fin = FINISH.get(final.finish_reason, final.finish_reason)
        lp = self.logprobs(entries)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": fin}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": fin}
            out = self._head("text_completion")
        choices = [choice]
        for i, b in enumerate(final.beams[1:], 1):  # beam search: the other returned beams, best first
            choices.append(dict(choice, index=i, **({"message": {"role": "assistant", "content": b.text}} if self.chat
                                                    else {"text": b.text})))
        more = extras(final)
        if final.beams:
            more["beam_scores"] = [round(b.score, 6) for b in final.beams]
        return dict(out, choices=choices, usage=usage(final), medusa=more)

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False, entries=None) -> dict:
        lp = self.logprobs(entries) if entries is not None else None
        if self.chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return dict(self._head("chat.completion.chunk"), choices=[choice])
        return dict(self._head("text_completion"), choices=[{"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}])
