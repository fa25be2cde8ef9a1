"""The tokenizer deployment's logic: chat template and text -> ids for a request (with its stop
sequences), and incremental detokenisation for streaming: stateless on the server (the caller
keeps the offsets, so any tokenizer replica can serve any chunk), or done by the caller itself
with the decoder this service hands out (decoder_json), which saves a call per chunk.

Knows medusa.tokenizer; nothing of engines, tenants or the wire."""
from __future__ import annotations

from medusa.errors import RequestError
from medusa.tokenizer import Tokenizer
from services import telemetry
from services.detok import decode_delta


class TokenizerService:
    def __init__(self, tokenizer: Tokenizer, tracing: str | None = None):
        self.tok = tokenizer
        self.tracer = telemetry.setup("tokenizer", tracing)

    def encode(self, req: dict) -> dict:
        """{"messages" | "prompt", "stop": [str], "trace"} -> {"prompt_ids", "stop_sequences"}, or
        {"error": reason} for bad input (returned, not raised: Serve logs a traceback for every
        exception a replica raises, and a rejected request must not write one)."""
        try:
            return self._encode(req)
        except RequestError as e:
            return {"error": str(e)}

    def _encode(self, req: dict) -> dict:
        with self.tracer.start_as_current_span("tokenizer.encode", context=telemetry.extract(req.get("trace"))) as span:
            if req.get("messages") is not None:
                ids = self.tok.encode_chat(req["messages"])
            elif req.get("prompt"):
                ids = self.tok.encode(req["prompt"])
            else:
                raise RequestError("the prompt is empty")
            if not ids:
                raise RequestError("the prompt encodes to no tokens")
            stops = [self.tok.encode(s) for s in req.get("stop") or ()]
            span.set_attribute("medusa.prompt_tokens", len(ids))
            return {"prompt_ids": ids, "stop_sequences": [s for s in stops if s]}

    def detokenize(self, ids: list[int], prefix_offset: int, read_offset: int, final: bool = False) -> tuple[str, int, int]:
        return decode_delta(self.tok, ids, prefix_offset, read_offset, final)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text alone (logprobs' `token`)."""
        return [self.tok.token_text(i) for i in ids]

    def decoder_json(self) -> str | None:
        """The fast tokenizer's definition (tokenizer.json text), so a caller can detokenise a
        stream next to it with exactly this tokenizer's decoding; None for a slow tokenizer."""
        backend = getattr(getattr(self.tok, "hf", None), "backend_tokenizer", None)
        return backend.to_str() if backend is not None else None

    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tok.eos_token_ids

    def spans(self) -> list[dict]:
        return telemetry.finished_spans()

    def health(self) -> str:
        return "ok"
