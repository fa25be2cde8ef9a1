"""The text of a generated token stream, as the ingress sends it: incremental detokenisation
(locally with the decoder the Tokenizer deployment hands out, else a call to that deployment
per chunk), each token's text alone for the logprob entries, and the token-by-token path that
tells each entry which characters its token added (services.logprobs.LogprobStream).

The Tokenizer deployment handle is duck-typed (`h.method.remote(...)`), as in services.ingress.

Knows token ids, text and logprob entries; nothing of tenants, sessions or engines."""
from __future__ import annotations

import logging

from services.detok import JsonDecoder, decode_delta
from services.limits import cause
from services.logprobs import LogprobStream, entries, ids_of

log = logging.getLogger("medusa.services.ingress")  # the ingress's logger: these lines are its own


class TextStream:
    """detokenizer() -> the detok function of this ingress; texts(ids) -> each token's text
    alone; lp_text(...) -> the text new tokens add, with their logprob entries placed."""

    def __init__(self, tokenizer, local_detokenize: bool):
        self.tokenizer = tokenizer
        self.local_detokenize = local_detokenize
        self._detok = None
        self._decoder = None  # the local decoder, when the Tokenizer deployment handed one out
        self._token_text: dict[int, str] = {}  # token id -> its text alone (logprobs), at most a vocabulary

    async def detokenizer(self):
        """detok(ids, prefix_offset, read_offset, final) -> (text, prefix, read): local with the
        decoder the Tokenizer deployment hands out (a call per chunk saved), else remote."""
        if self._detok is None:
            spec = None
            if self.local_detokenize:
                try:
                    spec = await self.tokenizer.decoder_json.remote()
                except Exception as e:  # noqa: BLE001 - fall back to the remote path
                    log.warning("no local decoder (%s): detokenising through the Tokenizer deployment", type(cause(e)).__name__)
            if spec:
                dec = self._decoder = JsonDecoder(spec)

                async def detok(ids, p, r, final):
                    return decode_delta(dec, ids, p, r, final)
            else:
                async def detok(ids, p, r, final):
                    return await self.tokenizer.detokenize.remote(ids, p, r, final)
            self._detok = detok
        return self._detok

    async def texts(self, ids: set[int]) -> dict[int, str]:
        """Each token's text alone (for logprobs): from the local decoder, else one call to the
        Tokenizer deployment for the ids not seen before."""
        missing = [i for i in ids if i not in self._token_text]
        if missing:
            await self.detokenizer()
            if self._decoder is not None:
                texts = [self._decoder.token_text(i) for i in missing]
            else:
                texts = await self.tokenizer.token_texts.remote(missing)
            self._token_text.update(zip(missing, texts))
        return {i: self._token_text[i] for i in ids}

    async def lp_text(self, detok, ids: list[int], new: list[int], ev: dict, prefix: int, read: int, final: bool,
                      lp: LogprobStream, eos: bool = False) -> tuple[str, int, int]:
        """The text the new tokens add, detokenised token by token so that each token's logprob
        entry knows which characters it added (LogprobStream). eos: the last new token is the
        end-of-sequence token that ended the request: like its text, its entry is not output
        (OpenAI's logprobs cover the returned content). Returns (text, prefix, read)."""
        event = ev.get("logprobs") or []
        if eos:
            event = event[:len(new) - 1]
        msgs = entries(new, event, await self.texts(ids_of(new, event)))
        base, parts = len(ids) - len(new), []
        for j in range(len(new)):
            t, p, r = await detok(ids[prefix:base + j + 1], 0, read - prefix, final and j == len(new) - 1)
            prefix, read = prefix + p, prefix + r
            parts.append(t)
            if j < len(msgs):
                lp.add(msgs[j], len(t))
        return "".join(parts), prefix, read
